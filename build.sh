#!/usr/bin/env bash
# Build the algorithm's container image, with docker or podman, without network in the build.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: ./build.sh [--tag NAME] [--api invoke|exec] [--base-image IMAGE]
                  [--bake-model [--allow-random-weights]]

Resolves the Python packages for the base image into wheelhouse/ on the host
(scripts/wheelhouse.sh; kept while requirements.txt and the base image's Python match),
then builds the image (default tag: stoic-balaitous) from the Dockerfile, which installs
them with 'pip install --no-index': the build itself reaches no network.

--api chooses grand-challenge's container API (the image's label
org.grand-challenge.api-method and its entry point). invoke (the default): a web server
on port 4743 that loads the model once and runs one job per POST /invoke (python -m
stoic_ct serve). exec: the entry point runs one job to completion (python -m process).

By default the image holds code and dependencies only: the model files are mounted at
/opt/ml/model when it runs (./test.sh does; grand-challenge extracts the uploaded
model.tar.gz there). --bake-model puts model/ into the image as well (fetching what it
lacks and checking all four files first; python -m stoic_ct fetch-weights, in .venv:
run 'make setup' once); model/ with random weights is refused unless
--allow-random-weights (for tests).

--base-image IMAGE builds on another base (default: the Dockerfile's BASE_IMAGE, the
PyTorch 2.13.0 CUDA 12.6 image, pinned by digest): it must have Python >= 3.11 as 'python' and torch
2.13.0. The engine is docker when its service answers, else podman (CONTAINER_ENGINE
chooses).
USAGE
}

here="$(cd "$(dirname "$0")" && pwd -P)"
options="base-image bake-model allow-random-weights api"
# shellcheck source=scripts/args.sh
source "$here/scripts/args.sh"
# shellcheck source=scripts/engine.sh
source "$here/scripts/engine.sh"
# shellcheck source=scripts/model.sh
source "$here/scripts/model.sh"

target=$api
if [ "$bake_model" = true ]; then
    check_model_dir "$here/model"
    target=$api-model-baked
fi

"$here/scripts/wheelhouse.sh" "$base_image" "$here/wheelhouse"
"$engine" build --target "$target" --build-arg "BASE_IMAGE=$base_image" --tag "$tag" "$here"

# Sizes: the whole image, its base, and each layer the Dockerfile adds (newest first).
size() { "$engine" image inspect --format '{{.Size}}' "$1" | numfmt --to=si --suffix=B; }
layers() { "$engine" history --quiet "$1" | wc -l; }
echo "built image $tag ($target, on $base_image, with $engine): $(size "$tag"), of which the base $(size "$base_image"); the layers added:"
"$engine" history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$tag" \
    | awk -F'\t' -v added="$(( $(layers "$tag") - $(layers "$base_image") ))" \
        'NR <= added && $1 !~ /^0 ?B$/ { sub(/^\/bin\/sh -c (#\(nop\) )?/, "", $2); printf "    %9s  %.90s\n", $1, $2 }'
