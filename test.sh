#!/usr/bin/env bash
# Build the image and run it on the shipped test case the way grand-challenge runs it.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: ./test.sh [--tag NAME]

Builds the image (./build.sh), runs it on test/input with the STOIC smoke-test flags
(--gpus all --network none --memory=16g --cap-drop=ALL --security-opt=no-new-privileges
--pids-limit 256 --shm-size=128m, input mounted read-only) and compares both outputs with
test/expected_output.json within 1e-4. Where that file has no values for the model files
in model/, it checks that both outputs are probabilities and says so.
USAGE
}

here="$(cd "$(dirname "$0")" && pwd -P)"
# shellcheck source=scripts/args.sh
source "$here/scripts/args.sh"

"$here/build.sh" --tag "$tag"

gpus=(--gpus all)
if ! docker run --rm "${gpus[@]}" --network none --entrypoint true "$tag" >/dev/null 2>&1; then
    echo "warning: Docker cannot give this container a GPU (--gpus all failed: no NVIDIA GPU," \
         "driver or container toolkit); running on the CPU, which takes minutes" >&2
    gpus=()
fi

output="$(mktemp -d)"
trap 'rm -rf "$output"' EXIT
chmod 777 "$output"

docker run --rm "${gpus[@]}" \
    --network none \
    --memory=16g --memory-swap=16g \
    --cap-drop=ALL \
    --security-opt=no-new-privileges \
    --pids-limit 256 \
    --shm-size=128m \
    --volume "$here/test/input:/input:ro" \
    --volume "$output:/output" \
    "$tag"

# Standard library only: any python3 will do.
cd "$here"
python3 -m stoic_ct.expected "$output" --model-dir "$here/model"
