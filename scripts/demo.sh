#!/usr/bin/env bash
# Run the algorithm on the shipped test case (test/input) exactly as the container runs it,
# with the model files of model/ when all four are there. Without them (they are not in
# git: see model/README.md) it says so loudly and uses randomly initialised weights in the
# published layouts, which check the setup but give meaningless probabilities.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || { echo "error: $python not found; run 'make demo' (it sets up .venv)" >&2; exit 1; }

model_dir=model
missing=()
for name in $("$python" -c 'from stoic_ct.model_files import ALL_FILES; print(*(f.name for f in ALL_FILES))'); do
    [ -f "$model_dir/$name" ] || missing+=("$name")
done
if [ ${#missing[@]} -gt 0 ]; then
    model_dir=.cache/random-model
    cat >&2 <<BANNER
================================================================================
 model/ lacks ${missing[*]}
 (see model/README.md for where to get the real files).
 Running the shipped test case with RANDOMLY INITIALISED encoders in the published
 layouts ($model_dir) and the published heads: this checks the setup end to end;
 the probabilities mean nothing.
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
for file in test/output/*.json; do
    echo "$(basename "$file"): $(cat "$file")"
done
