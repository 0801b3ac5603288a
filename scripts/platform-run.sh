#!/usr/bin/env bash
# Run the image as grand-challenge runs an algorithm job.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: scripts/platform-run.sh [--model DIR] [--engine-arg ARG]... IMAGE INPUT OUTPUT [ARG...]

Runs IMAGE as grand-challenge runs a job: no network, every capability dropped, no new
privileges, 256 processes, 8 GB of memory and no swap, 128 MB of /dev/shm, a read-only
root file system with an empty writable /tmp, INPUT mounted read-only at /input, OUTPUT
(which the image's user, uid 1001, must be able to write) at /output, and the model
folder DIR, when given, read-only at /opt/ml/model. A GPU is requested only where the
engine can give one: docker with the NVIDIA runtime (--gpus all), podman with a CDI
specification of nvidia.com/gpu (--device nvidia.com/gpu=all); otherwise it says that the
job runs on the CPU. ARGs after OUTPUT go to the image's entry point; --engine-arg passes
an option to the engine's run (e.g. --engine-arg=--entrypoint=python). Exits with the
container's status.
USAGE
}

here="$(cd "$(dirname "$0")/.." && pwd -P)"
model=""
engine_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --model) model="${2:?--model needs a folder}"; shift 2 ;;
        --engine-arg) engine_args+=("${2:?--engine-arg needs an option}"); shift 2 ;;
        --engine-arg=*) engine_args+=("${1#--engine-arg=}"); shift ;;
        -*) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
        *) break ;;
    esac
done
[ $# -ge 3 ] || { usage >&2; exit 2; }
image=$1 input=$2 output=$3
shift 3
# shellcheck source=scripts/engine.sh
source "$here/scripts/engine.sh"

gpus=()
if [ "$engine" = docker ] && docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"nvidia"'; then
    gpus=(--gpus all)
elif [ "$engine" = podman ] && grep -qs 'nvidia.com/gpu' /etc/cdi/*.yaml /etc/cdi/*.json /var/run/cdi/*.yaml /var/run/cdi/*.json; then
    gpus=(--device nvidia.com/gpu=all)
else
    echo "no GPU that $engine can give to a container (docker needs the NVIDIA runtime, podman a CDI specification); the job runs on the CPU"
fi

volumes=(--volume "$(cd "$input" && pwd -P):/input:ro" --volume "$(cd "$output" && pwd -P):/output")
[ -z "$model" ] || volumes+=(--volume "$(cd "$model" && pwd -P):/opt/ml/model:ro")

exec "$engine" run --rm "${gpus[@]}" \
    --network none \
    --cap-drop=ALL \
    --security-opt=no-new-privileges \
    --pids-limit 256 \
    --memory=8g --memory-swap=8g \
    --shm-size=128m \
    --read-only \
    --tmpfs /tmp:rw,exec,mode=1777 \
    "${volumes[@]}" \
    "${engine_args[@]}" \
    "$image" "$@"
