#!/usr/bin/env bash
# Resolve the image's Python packages on the host, so that the image build needs no network.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: scripts/wheelhouse.sh BASE_IMAGE [DEST]

Downloads the wheels of the image's part of requirements.txt (the pinned lines above its
"not in the image" mark; torch excepted, which the base image brings) for the Python
version, machine and C library of BASE_IMAGE into DEST (default: wheelhouse/ in the
repository), with that list as DEST/requirements.txt. The Dockerfile installs them from
there with 'pip install --no-index --no-deps': the image build reaches no package index,
so a proxy that intercepts TLS does not matter to it, and an air-gapped machine builds
from a wheelhouse made elsewhere (copy wheelhouse/ over; it is kept while DEST/.key
matches the list and the base image).

pip is the host's (.venv/bin/python -m pip when it exists, else python3 -m pip), with the
host's index settings. The base image is pulled if it is not present.
USAGE
}

case "${1:-}" in -h|--help) usage; exit 0 ;; "") usage >&2; exit 2 ;; esac
base_image=$1
here="$(cd "$(dirname "$0")/.." && pwd -P)"
dest=${2:-$here/wheelhouse}
# shellcheck source=scripts/engine.sh
source "$here/scripts/engine.sh"

if ! "$engine" image inspect "$base_image" >/dev/null 2>&1; then
    echo "pulling $base_image"
    if ! "$engine" pull "$base_image" >&2; then
        echo "error: cannot pull the base image $base_image (above: why); build on another with --base-image IMAGE" >&2
        exit 1
    fi
fi
# "<major><minor> <machine> <libc> <libc version>", e.g. "311 x86_64 glibc 2.35"
probe='import platform, sys; print(f"{sys.version_info[0]}{sys.version_info[1]}", platform.machine(), *platform.libc_ver())'
read -r python_version machine libc libc_version < <(
    "$engine" run --rm --network none --entrypoint python "$base_image" -c "$probe"
) || { echo "error: $base_image has no 'python' that answers" >&2; exit 1; }
[ "$libc" = glibc ] || { echo "error: $base_image uses $libc, not glibc: no manylinux wheels fit it" >&2; exit 1; }

# The pinned lines before the mark, torch left out.
requirements=$(sed '/^# ---- not in the image ----$/q' "$here/requirements.txt" | grep -v -E '^(#|$|torch==)')
key="$(printf '%s\n' "$requirements" | sha256sum | cut -c1-16) cp$python_version $machine glibc$libc_version"
if [ -f "$dest/.key" ] && [ "$(cat "$dest/.key")" = "$key" ]; then
    echo "wheelhouse $dest is up to date (cp$python_version, $machine, glibc $libc_version)"
    exit 0
fi

platforms=()
for minor in $(seq 17 "${libc_version#2.}"); do
    platforms+=(--platform "manylinux_2_${minor}_$machine")
done
platforms+=(--platform "manylinux2014_$machine" --platform "linux_$machine")

python="$here/.venv/bin/python"
[ -x "$python" ] || python=python3
rm -rf "$dest"
mkdir -p "$dest"
echo "downloading the wheels of requirements.txt for cp$python_version on $machine (glibc $libc_version) into $dest"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
    --implementation cp --python-version "$python_version" \
    --abi "cp$python_version" --abi abi3 --abi none "${platforms[@]}" \
    --requirement <(printf '%s\n' "$requirements")
printf '%s\n' "$requirements" > "$dest/requirements.txt"
printf '%s\n' "$key" > "$dest/.key"
echo "wheelhouse ready: $(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1)"
