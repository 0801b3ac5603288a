#!/usr/bin/env bash
# Build the image and save it, with the model tarball, for upload to grand-challenge.org.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: ./export.sh [--tag NAME]

Builds the image (./build.sh, which fetches and checks the model files) and writes:
  NAME.tar.gz    the image, for the algorithm's container upload
  model.tar.gz   the files of model/ and their MANIFEST, for the separate model upload
                 (grand-challenge extracts it at /opt/ml/model, where it takes precedence)
USAGE
}

here="$(cd "$(dirname "$0")" && pwd -P)"
# shellcheck source=scripts/args.sh
source "$here/scripts/args.sh"

"$here/build.sh" --tag "$tag"

docker save "$tag" | gzip -c > "$here/$tag.tar.gz"
echo "wrote $here/$tag.tar.gz ($(du -h "$here/$tag.tar.gz" | cut -f1))"
# The files build.sh checked: those its MANIFEST lists ("<sha256>  <name>" lines).
mapfile -t files < <(cut -d' ' -f3- "$here/model/MANIFEST")
tar --create --gzip --file "$here/model.tar.gz" --directory "$here/model" "${files[@]}" MANIFEST
echo "wrote $here/model.tar.gz ($(du -h "$here/model.tar.gz" | cut -f1))"
