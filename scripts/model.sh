# shellcheck shell=bash
# shellcheck disable=SC2154  # $here and $allow_random_weights come from the sourcing script
# Checks a folder of model files for build.sh, test.sh and export.sh; sourced, not run.
# Needs $here and $allow_random_weights (scripts/args.sh).

# check_model_dir DIR: fetch what DIR lacks and check all four files (fetch-weights), or,
# when DIR holds random weights, accept it only with --allow-random-weights. Exits on failure.
check_model_dir() {
    local dir=$1 python="$here/.venv/bin/python"
    if [ -e "$dir/RANDOM_WEIGHTS" ]; then
        if [ "$allow_random_weights" != true ]; then
            echo "error: $dir holds randomly initialised weights (RANDOM_WEIGHTS), whose probabilities mean nothing; put the real files there (python -m stoic_ct fetch-weights --dest $dir), or pass --allow-random-weights for a test" >&2
            exit 1
        fi
        echo "warning: $dir holds RANDOMLY INITIALISED weights (--allow-random-weights): this checks the container, its probabilities mean nothing" >&2
        return 0
    fi
    [ -x "$python" ] || python=python3
    if ! (cd "$here" && "$python" -c 'import torch, lungmask, stoic_ct.weights.fetch') >/dev/null 2>&1; then
        echo "error: checking the model files needs the project's Python environment; run 'make setup' first" >&2
        exit 1
    fi
    if ! (cd "$here" && "$python" -m stoic_ct fetch-weights --dest "$dir"); then
        echo "error: $dir does not hold the four checked model files (see above)" >&2
        exit 1
    fi
}
