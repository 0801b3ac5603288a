# shellcheck shell=bash
# shellcheck disable=SC2154  # $here and $allow_random_weights come from the sourcing script
# Checks a folder of model files for build.sh, test.sh and export.sh; sourced, not run.
# Needs $here and $allow_random_weights (scripts/args.sh).

# check_model_dir DIR: DIR must hold, checked, every file of the system it holds. With a
# system.json (what train.py, fit-heads, install-heads and fit-ensemble write): each file it
# names, against the MANIFEST (check-model). Without one, the four published files: fetch
# what DIR lacks and check all four (fetch-weights). Random weights (a RANDOM_WEIGHTS
# marker) are accepted only with --allow-random-weights. Exits on failure.
check_model_dir() {
    local dir=$1 python="$here/.venv/bin/python"
    if [ -e "$dir/RANDOM_WEIGHTS" ]; then
        if [ "$allow_random_weights" != true ]; then
            echo "error: $dir holds randomly initialised weights (RANDOM_WEIGHTS), whose probabilities mean nothing; put the real files there (python -m stoic_ct fetch-weights --dest $dir), or pass --allow-random-weights for a test" >&2
            exit 1
        fi
        echo "warning: $dir holds RANDOMLY INITIALISED weights (--allow-random-weights): this checks the container, its probabilities mean nothing" >&2
        [ -e "$dir/system.json" ] || return 0
    fi
    [ -x "$python" ] || python=python3
    if ! (cd "$here" && "$python" -c 'import torch, lungmask, stoic_ct.weights.fetch') >/dev/null 2>&1; then
        echo "error: checking the model files needs the project's Python environment; run 'make setup' first" >&2
        exit 1
    fi
    if [ -e "$dir/system.json" ]; then
        (cd "$here" && "$python" -m stoic_ct check-model --model-dir "$dir") \
            || { echo "error: $dir does not hold, checked, the files its system.json names (see above)" >&2; exit 1; }
    elif ! (cd "$here" && "$python" -m stoic_ct fetch-weights --dest "$dir"); then
        echo "error: $dir does not hold the four checked model files (see above)" >&2
        exit 1
    fi
}
