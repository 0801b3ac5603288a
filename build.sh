#!/usr/bin/env bash
# Build the algorithm's Docker image, with the model files baked in.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: ./build.sh [--tag NAME]

Fetches whatever model files model/ lacks and checks them all (python -m stoic_ct
fetch-weights, in .venv: run 'make setup' once), then builds the STOIC2021 algorithm
image (default tag: stoic-balaitous) with the files of model/ baked in. Without network,
put the four files in model/ by hand (model/README.md says where they are published).
USAGE
}

here="$(cd "$(dirname "$0")" && pwd -P)"
# shellcheck source=scripts/args.sh
source "$here/scripts/args.sh"

command -v docker >/dev/null 2>&1 || { echo "error: docker is not installed or not on PATH" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "error: cannot reach the Docker engine (is it running? may this user use it?)" >&2; exit 1; }

python="$here/.venv/bin/python"
[ -x "$python" ] || python=python3
if ! (cd "$here" && "$python" -c 'import torch, lungmask, stoic_ct.fetch') >/dev/null 2>&1; then
    echo "error: checking the model files needs the project's Python environment; run 'make setup' first" >&2
    exit 1
fi
if [ -e "$here/model/RANDOM_WEIGHTS" ]; then
    echo "error: model/ holds randomly initialised weights (model/RANDOM_WEIGHTS); empty it and run again" >&2
    exit 1
fi
if ! (cd "$here" && "$python" -m stoic_ct fetch-weights --dest "$here/model"); then
    echo "error: model/ does not hold the four checked model files (see above); the image was not built" >&2
    exit 1
fi

docker build --tag "$tag" "$here"
echo "built image $tag"
