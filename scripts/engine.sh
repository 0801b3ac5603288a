# shellcheck shell=bash
# The container engine for build.sh, test.sh, export.sh and the container test; sourced, not run.
# Sets $engine: $CONTAINER_ENGINE when set (docker or podman), else docker when its engine
# answers, else podman. Exits with one line saying what is missing when neither works.
# podman reads its settings from $CONTAINERS_CONF when set (the container test sets its own).

engine_answers() {
    "$1" info >/dev/null 2>&1
}

if [ -n "${CONTAINER_ENGINE:-}" ]; then
    engine="$CONTAINER_ENGINE"
    command -v "$engine" >/dev/null 2>&1 || { echo "error: CONTAINER_ENGINE=$engine is not on PATH" >&2; exit 1; }
    engine_answers "$engine" || { echo "error: $engine does not answer ('$engine info' fails: is its service running, may this user use it?)" >&2; exit 1; }
elif command -v docker >/dev/null 2>&1 && engine_answers docker; then
    engine=docker
elif command -v podman >/dev/null 2>&1 && engine_answers podman; then
    engine=podman
elif command -v docker >/dev/null 2>&1; then
    echo "error: cannot reach the Docker engine (is it running? may this user use it?), and podman is not usable either" >&2
    exit 1
else
    echo "error: no container engine: install Docker or podman (or set CONTAINER_ENGINE)" >&2
    exit 1
fi
