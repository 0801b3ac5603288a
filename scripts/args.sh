# shellcheck shell=bash
# Argument parsing shared by build.sh, test.sh and export.sh; sourced, not run.
# The sourcing script defines usage() first. Sets $tag (default stoic-balaitous).

# shellcheck disable=SC2034  # read by the scripts that source this file
tag=stoic-balaitous
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --tag) tag="${2:?--tag needs a name}"; shift 2 ;;
        *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
