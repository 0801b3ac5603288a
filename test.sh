#!/usr/bin/env bash
# Build the image and run it on the shipped test case the way grand-challenge runs it.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: ./test.sh [--tag NAME] [--api invoke|exec] [--base-image IMAGE]
                 [--model-dir DIR | --bake-model] [--allow-random-weights]

Builds the image (./build.sh, same options; the invoke API by default), then runs it on
test/input as grand-challenge runs a job with the image's API (scripts/platform-run.sh:
no network, read-only input and root file system, an empty /tmp, 8 GB of memory and data
limit, uid 1001, a GPU only where the engine can give one; invoke: the server started,
/health polled, one POST /invoke, then SIGTERM) with
the model folder DIR (default: model/, after fetching what it lacks and checking all four
files) mounted read-only at /opt/ml/model; with --bake-model the image carries model/
instead. Both outputs are compared with test/expected_output.json within 1e-4 when that
file has values for these model files; otherwise they are checked to be probabilities,
and it says that the values were not compared. Last, it lists what the container wrote
to stderr, which the platform shows as warnings on the result.

A model folder with random weights is refused unless --allow-random-weights (for tests:
python -m stoic_ct random-weights --dest DIR writes one).
USAGE
}

here="$(cd "$(dirname "$0")" && pwd -P)"
options="base-image bake-model model-dir allow-random-weights api"
# shellcheck source=scripts/args.sh
source "$here/scripts/args.sh"
# shellcheck source=scripts/engine.sh
source "$here/scripts/engine.sh"
# shellcheck source=scripts/model.sh
source "$here/scripts/model.sh"

build=(--tag "$tag" --api "$api" --base-image "$base_image")
run=()
if [ "$bake_model" = true ]; then
    [ -z "$model_dir" ] || { echo "error: --bake-model bakes model/; it takes no --model-dir" >&2; exit 2; }
    model_dir="$here/model"
    build+=(--bake-model)
    [ "$allow_random_weights" = false ] || build+=(--allow-random-weights)
else
    model_dir="${model_dir:-$here/model}"
    check_model_dir "$model_dir"
    run=(--model-dir "$model_dir")
fi
"$here/build.sh" "${build[@]}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/output"
chmod 777 "$work/output"
echo "running $tag on test/input as grand-challenge does (the $api API)"
"$here/scripts/platform-run.sh" "${run[@]}" "$tag" "$here/test/input" "$work/output" \
    2> >(tee "$work/stderr" >&2)
# Wait for tee to write all of stderr.
wait

# Standard library only: any python3 will do.
cd "$here"
python3 -m scripts.check_outputs "$work/output" --model-dir "$model_dir"
if [ -s "$work/stderr" ]; then
    echo "the container wrote $(wc -l < "$work/stderr") line(s) to stderr, which grand-challenge shows as warnings on the result:"
    sed 's/^/    /' "$work/stderr"
else
    echo "the container wrote nothing to stderr"
fi
