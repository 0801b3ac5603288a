#!/usr/bin/env bash
# Run the algorithm on the shipped test case (test/input) exactly as the container runs it,
# then check its outputs against test/expected_output.json.
#
# It first fetches the four model files into model/ (python -m stoic_ct fetch-weights).
# Where they cannot all be fetched (offline, or a server down), it says so loudly and
# runs with randomly initialised encoders in the published layouts (.cache/random-model):
# that checks the setup end to end, and its expected values are known, but those
# probabilities mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || { echo "error: $python not found; run 'make demo' (it sets up .venv)" >&2; exit 1; }

model_dir=model
if ! "$python" -m stoic_ct fetch-weights --dest "$model_dir"; then
    model_dir=.cache/random-model
    cat >&2 <<BANNER
================================================================================
 The real model files could not all be fetched (see above; model/README.md says
 where they are published). Running the shipped test case with RANDOMLY
 INITIALISED encoders in the published layouts ($model_dir) and the
 published heads: this checks the setup end to end; the probabilities mean nothing.
================================================================================
BANNER
    if [ ! -f "$model_dir/RANDOM_WEIGHTS" ]; then
        heads=$("$python" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("balaitous"); print(pathlib.Path(s.origin).parents[1] / "assets" / "balaitous.npz" if s else "")')
        "$python" -m stoic_ct random-weights --dest "$model_dir" ${heads:+--heads "$heads"}
    fi
fi

rm -rf test/output
"$python" process.py --input test/input --output test/output --model-dir "$model_dir"
echo
"$python" -m scripts.check_outputs test/output --model-dir "$model_dir"
