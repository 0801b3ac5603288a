"""`python -m stoic_ct`: see stoic_ct.cli."""

from stoic_ct.cli import main

raise SystemExit(main())
