#!/usr/bin/env bash
# Build the algorithm's Docker image.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: ./build.sh [--tag NAME]

Builds the STOIC2021 algorithm image (default tag: stoic-balaitous) from this folder.
The model files in model/ are baked into the image: all four must be there, and they
must not be the random ones that 'python -m stoic_ct random-weights' writes.
USAGE
}

here="$(cd "$(dirname "$0")" && pwd -P)"
# shellcheck source=scripts/args.sh
source "$here/scripts/args.sh"
command -v docker >/dev/null 2>&1 || { echo "error: docker is not installed or not on PATH" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "error: cannot reach the Docker engine (is it running? may this user use it?)" >&2; exit 1; }

missing=()
for name in vitl_16_ct.pth vitl_16_pt22k.pth unet_r231-d5d2fc3d.pth balaitous.npz; do
    [ -s "$here/model/$name" ] || missing+=("$name")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "error: model/ lacks ${missing[*]}; see model/README.md for where to get them" >&2
    exit 1
fi
if [ -e "$here/model/RANDOM_WEIGHTS" ]; then
    echo "error: model/ holds randomly initialised weights (model/RANDOM_WEIGHTS); put the real files there" >&2
    exit 1
fi

docker build --tag "$tag" "$here"
echo "built image $tag"
