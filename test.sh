#!/usr/bin/env bash
# Build the image and run it on the shipped test case the way grand-challenge runs it.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: ./test.sh [--tag NAME]

Builds the image (./build.sh), runs it on test/input with the STOIC smoke-test flags
(--network none, read-only input, no capabilities, 16 GB, GPU when there is one) and
checks that both outputs are JSON probabilities in [0, 1].
USAGE
}

here="$(cd "$(dirname "$0")" && pwd -P)"
# shellcheck source=scripts/args.sh
source "$here/scripts/args.sh"
"$here/build.sh" --tag "$tag"

gpus=()
if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
    gpus=(--gpus all)
else
    echo "warning: Docker has no NVIDIA runtime; running on the CPU (slow, minutes)" >&2
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

status=0
for name in probability-covid-19.json probability-severe-covid-19.json; do
    if [ ! -f "$output/$name" ]; then
        echo "FAIL: /output/$name was not written" >&2
        status=1
    elif python3 -c 'import json, sys; v = json.load(open(sys.argv[1])); sys.exit(0 if isinstance(v, float) and 0 <= v <= 1 else 1)' "$output/$name"; then
        echo "ok: $name = $(cat "$output/$name")"
    else
        echo "FAIL: /output/$name is not a probability: $(cat "$output/$name")" >&2
        status=1
    fi
done
exit $status
