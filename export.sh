#!/usr/bin/env bash
# Build the image and save it, with the model tarball, for upload to grand-challenge.org.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: ./export.sh [--tag NAME]

Builds the image (./build.sh) and writes:
  NAME.tar.gz    the image, for the algorithm's container upload
  model.tar.gz   the files of model/, for the separate model upload (extracted at /opt/ml/model)
USAGE
}

here="$(cd "$(dirname "$0")" && pwd -P)"
# shellcheck source=scripts/args.sh
source "$here/scripts/args.sh"
"$here/build.sh" --tag "$tag"

docker save "$tag" | gzip -c > "$here/$tag.tar.gz"
echo "wrote $here/$tag.tar.gz"
tar --create --gzip --file "$here/model.tar.gz" --directory "$here/model" \
    vitl_16_ct.pth vitl_16_pt22k.pth unet_r231-d5d2fc3d.pth balaitous.npz
echo "wrote $here/model.tar.gz"
