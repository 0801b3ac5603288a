"""The repository's helper scripts; check_outputs runs as `python3 -m scripts.check_outputs`."""
