#!/usr/bin/env bash
# Build the image and save it, with the model tarball, for upload to grand-challenge.org.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: ./export.sh [--tag NAME] [--base-image IMAGE] [--model-dir DIR]

Checks the model folder DIR (default model/: fetches what it lacks, checks all four files;
random weights are refused), builds the image (./build.sh: code and dependencies, no model
files), and writes:
  NAME.tar.gz    the image, for the algorithm's container upload
  model.tar.gz   the four files of DIR and their MANIFEST, for the algorithm's separate
                 model upload (grand-challenge extracts it at /opt/ml/model)
USAGE
}

here="$(cd "$(dirname "$0")" && pwd -P)"
options="base-image model-dir"
# shellcheck source=scripts/args.sh
source "$here/scripts/args.sh"
# shellcheck source=scripts/engine.sh
source "$here/scripts/engine.sh"
# shellcheck source=scripts/model.sh
source "$here/scripts/model.sh"

model_dir="${model_dir:-$here/model}"
check_model_dir "$model_dir"
"$here/build.sh" --tag "$tag" --base-image "$base_image"

"$engine" save "$tag" | gzip -c > "$here/$tag.tar.gz"
echo "wrote $here/$tag.tar.gz ($(du -h "$here/$tag.tar.gz" | cut -f1))"
# The files fetch-weights checked: those its MANIFEST lists ("<sha256>  <name>" lines).
mapfile -t files < <(cut -d' ' -f3- "$model_dir/MANIFEST")
tar --create --gzip --file "$here/model.tar.gz" --directory "$model_dir" "${files[@]}" MANIFEST
echo "wrote $here/model.tar.gz ($(du -h "$here/model.tar.gz" | cut -f1))"
