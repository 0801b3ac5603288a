#!/usr/bin/env bash
# Build the image and save it, with the model tarball, for upload to grand-challenge.org.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: ./export.sh [--tag NAME] [--api invoke|exec] [--base-image IMAGE] [--model-dir DIR]
                   [--dest FOLDER] [--model-only] [--allow-random-weights]

Checks the model folder DIR (default model/): every file of the system it holds (its
system.json, which train.py writes; without one, the four published files, fetched where
missing), each against its MANIFEST line. Random weights are refused unless
--allow-random-weights (for tests). Then builds the image (./build.sh: code and
dependencies, no model files; --api as there, invoke by default) and writes to FOLDER
(default: the repository):
  NAME.tar.gz    the image, for the algorithm's container upload
  model.tar.gz   the files DIR's MANIFEST lists, and the MANIFEST, for the algorithm's
                 separate model upload (grand-challenge extracts it at /opt/ml/model)
--model-only writes model.tar.gz alone, without building the image.
USAGE
}

here="$(cd "$(dirname "$0")" && pwd -P)"
options="base-image model-dir api model-only dest allow-random-weights"
# shellcheck source=scripts/args.sh
source "$here/scripts/args.sh"
# shellcheck source=scripts/engine.sh
[ "$model_only" = true ] || source "$here/scripts/engine.sh"
# shellcheck source=scripts/model.sh
source "$here/scripts/model.sh"

model_dir="${model_dir:-$here/model}"
check_model_dir "$model_dir"
mkdir -p "$dest"
if [ "$model_only" = false ]; then
    "$here/build.sh" --tag "$tag" --api "$api" --base-image "$base_image"
    "$engine" save "$tag" | gzip -c > "$dest/$tag.tar.gz"
    echo "wrote $dest/$tag.tar.gz ($(du -h "$dest/$tag.tar.gz" | cut -f1))"
fi
# The files the MANIFEST lists ("<sha256>  <name>" lines), and the marker of random weights
# (only with --allow-random-weights), so that the platform's run warns of them too.
mapfile -t files < <(cut -d' ' -f3- "$model_dir/MANIFEST")
[ ! -e "$model_dir/RANDOM_WEIGHTS" ] || files+=(RANDOM_WEIGHTS)
tar --create --gzip --file "$dest/model.tar.gz" --directory "$model_dir" "${files[@]}" MANIFEST
echo "wrote $dest/model.tar.gz ($(du -h "$dest/model.tar.gz" | cut -f1)): ${files[*]} MANIFEST"
