#!/usr/bin/env bash
# Run the image as grand-challenge runs an algorithm job, with either of its two APIs.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: scripts/platform-run.sh [--model-dir DIR] [--api exec|invoke] [--detach NAME]
                               [--engine-arg ARG]... IMAGE INPUT OUTPUT [ARG...]

Runs IMAGE as grand-challenge runs a job: no network, every capability dropped, no new
privileges, 256 processes, 8 GB of memory and no swap, the same 8 GB as the process's
data limit (RLIMIT_DATA, which the platform's shim sets too), 128 MB of /dev/shm, a
read-only root file system with an empty writable /tmp, INPUT mounted read-only at
/input, OUTPUT (which the image's user, uid 1001, must be able to write) at /output, and
the model folder DIR, when given, read-only at /opt/ml/model. A GPU is requested only
where the engine can give one: docker with the NVIDIA runtime (--gpus all), podman with a
CDI specification of nvidia.com/gpu (--device nvidia.com/gpu=all); otherwise it says that
the job runs on the CPU. ARGs after OUTPUT go to the image's entry point; --engine-arg
passes an option to the engine's run (e.g. --engine-arg=--entrypoint=python).

The API is the image's label org.grand-challenge.api-method, as on the platform (exec
when absent; --api chooses). exec: the entry point runs the job to completion; exits with
the container's status. invoke: the entry point is started as a web server; like the
platform's shim, this polls GET /health (from inside the container, on 127.0.0.1:4743)
until it answers 200, for 300 s at most, then calls POST /invoke once and stops the
container with SIGTERM (SIGKILL 5 s later), and prints its stdout and stderr; exits 0 when
/invoke answered 201. With --detach NAME the container, named NAME, is left running once
healthy, for the caller to invoke (scripts/invoke_client.py) and stop.
USAGE
}

here="$(cd "$(dirname "$0")/.." && pwd -P)"
model="" api="" detach=""
engine_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --model-dir) model="${2:?--model-dir needs a folder}"; shift 2 ;;
        --model)
            echo "warning: --model is deprecated and will be removed in the next release: it is now called --model-dir" >&2
            model="${2:?--model needs a folder}"; shift 2 ;;
        --api) api="${2:?--api needs exec or invoke}"; shift 2 ;;
        --detach) detach="${2:?--detach needs a container name}"; shift 2 ;;
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

if [ -z "$api" ]; then
    api=$("$engine" image inspect --format '{{ index .Config.Labels "org.grand-challenge.api-method" }}' "$image" 2>/dev/null || true)
    case "$api" in ""|"<no value>") api="exec" ;; esac
fi
case "$api" in exec|invoke) ;; *) echo "error: the API must be exec or invoke, not '$api'" >&2; exit 2 ;; esac
[ -z "$detach" ] || [ "$api" = invoke ] || { echo "error: --detach is for the invoke API" >&2; exit 2; }

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
memory=8g
bytes=$(numfmt --from=iec "${memory^^}")
# The shim sets the job's memory as RLIMIT_DATA too. podman drops the default_ulimits of
# its configuration ($CONTAINERS_CONF) once a --ulimit is given: they are given again.
limits=(--ulimit "data=$bytes:$bytes")
if [ "$engine" = podman ] && [ -f "${CONTAINERS_CONF:-}" ]; then
    while read -r configured; do
        [ -z "$configured" ] || limits+=(--ulimit "$configured")
    done < <(sed -n 's/^default_ulimits *= *\[\(.*\)\]/\1/p' "$CONTAINERS_CONF" | tr ',' '\n' | tr -d ' "')
fi
sandbox=(
    --network none
    --cap-drop=ALL
    --security-opt=no-new-privileges
    --pids-limit 256
    --memory="$memory" --memory-swap="$memory"
    "${limits[@]}"
    --shm-size=128m
    --read-only
    --tmpfs "/tmp:rw,exec,mode=1777"
)

if [ "$api" = exec ]; then
    exec "$engine" run --rm "${gpus[@]}" "${sandbox[@]}" "${volumes[@]}" "${engine_args[@]}" \
        "$image" "$@"
fi

# The invoke API, driven as the platform's shim drives it.
name=${detach:-stoic-invoke-$$}
client=$(cat "$here/scripts/invoke_client.py")
call() { "$engine" exec "$name" python -c "$client" "$@"; }
stop() {
    "$engine" stop --time 5 "$name" >/dev/null 2>&1 || true
    "$engine" logs "$name" >/dev/null || true
    "$engine" logs "$name" 2>/dev/null || true
    "$engine" rm --force "$name" >/dev/null 2>&1 || true
}
elapsed() { printf '%d.%d' $(( ($(date +%s%N) - started) / 1000000000 )) $(( ($(date +%s%N) - started) / 100000000 % 10 )); }
started=$(date +%s%N)
"$engine" run --detach --name "$name" "${gpus[@]}" "${sandbox[@]}" "${volumes[@]}" \
    "${engine_args[@]}" "$image" "$@" >/dev/null
[ -n "$detach" ] || trap stop EXIT
SECONDS=0
until call health 10 >/dev/null 2>&1; do
    if [ "$("$engine" inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
        echo "error: the server exited before it was healthy (its log follows)" >&2
        [ -z "$detach" ] || stop
        exit 1
    fi
    [ "$SECONDS" -lt 300 ] || { echo "error: /health did not answer 200 within 300 s" >&2; exit 1; }
    sleep 1
done
echo "healthy $(elapsed) s after the start"
[ -z "$detach" ] || exit 0
read -r status seconds < <(call invoke 3600 || true)
echo "POST /invoke: $status in $seconds s"
[ "$status" = 201 ]
