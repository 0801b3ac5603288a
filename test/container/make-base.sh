#!/usr/bin/env bash
# TEST ONLY: build a stand-in for the pinned PyTorch base image where it cannot be pulled.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: test/container/make-base.sh TAG

Builds image TAG: a Debian bookworm root file system made with debootstrap from the
distribution's packages (from \$DEBIAN_MIRROR, else the Debian mirror of apt's sources), its
Python 3.11, and the CPU build of torch 2.13.0 with the dependencies requirements.txt pins
(fetched on the host with pip). For the container test on machines without access to the
base image's registry; not for submissions: it has no CUDA. Needs root (debootstrap) and
the engine of scripts/engine.sh. Takes about 2 minutes.
USAGE
}

case "${1:-}" in -h|--help) usage; exit 0 ;; "") usage >&2; exit 2 ;; esac
image=$1
here="$(cd "$(dirname "$0")/../.." && pwd -P)"
# shellcheck source=scripts/engine.sh
source "$here/scripts/engine.sh"
command -v debootstrap >/dev/null 2>&1 || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root" >&2; exit 1; }

# The mirror apt uses here: the first archive (not security) URI of its sources.
apt_mirror() {
    { grep -h -E '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | tr ' ' '\n' | grep '://'
      grep -h -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | cut -d: -f2- | tr ' ' '\n' | grep '://'
    } | grep -v -- '-security' | head -n 1
}
mirror=${DEBIAN_MIRROR:-$(apt_mirror)}
[ -n "$mirror" ] || { echo "error: no Debian mirror in apt's sources here; set DEBIAN_MIRROR" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/stoic-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "debootstrap: Debian bookworm with python3 from $mirror into $work/rootfs"
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" \
    "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; echo "error: debootstrap failed (log above)" >&2; exit 1; }
rm -rf "$work/rootfs/var/cache/apt/archives"/*.deb "$work/rootfs/var/lib/apt/lists"/*
rootfs_image="$image-rootfs"
tar --numeric-owner -C "$work/rootfs" -c . | "$engine" import - "$rootfs_image" >/dev/null

python="$here/.venv/bin/python"
[ -x "$python" ] || python=python3
echo "downloading torch 2.13.0 (CPU build) and its dependencies for cp311"
mkdir "$work/context"
"$python" -m pip download --quiet --only-binary=:all: --dest "$work/context/wheels" \
    --implementation cp --python-version 311 --abi cp311 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --constraint <(grep -v -E '^(#|$|torch==)' "$here/requirements.txt") 'torch==2.13.0+cpu'
"$engine" build --build-arg "ROOTFS_IMAGE=$rootfs_image" --tag "$image" \
    --file "$here/test/container/base.Containerfile" "$work/context"
"$engine" rmi "$rootfs_image" >/dev/null
echo "built $image (test-only stand-in base: Debian bookworm, Python 3.11, torch 2.13.0+cpu)"
