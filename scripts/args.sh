# shellcheck shell=bash
# shellcheck disable=SC2154  # $here is set by the sourcing script
# Argument parsing shared by build.sh, test.sh and export.sh; sourced, not run.
# The sourcing script sets $here, defines usage() and lists the options it takes in $options (words
# among: base-image bake-model model-dir allow-random-weights api model-only dest). Every
# script takes --tag. Sets $tag, $base_image, $bake_model, $model_dir,
# $allow_random_weights, $api, $model_only, $dest.

# shellcheck disable=SC2034  # read by the scripts that source this file
tag=stoic-balaitous
# The Dockerfile's pinned base image, read from its one ARG line.
base_image=$(sed -n 's/^ARG BASE_IMAGE=//p' "$here/Dockerfile")
bake_model=false
model_dir=""
allow_random_weights=false
api=invoke
model_only=false
dest="$here"

takes() {
    case " ${options:-} " in *" $1 "*) return 0 ;; esac
    echo "error: unknown argument '--$1'" >&2; usage >&2; exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --tag) tag="${2:?--tag needs a name}"; shift 2 ;;
        --base-image) takes base-image; base_image="${2:?--base-image needs an image}"; shift 2 ;;
        --bake-model) takes bake-model; bake_model=true; shift ;;
        --model-dir) takes model-dir; model_dir="${2:?--model-dir needs a folder}"; shift 2 ;;
        --allow-random-weights) takes allow-random-weights; allow_random_weights=true; shift ;;
        --api) takes api; api="${2:?--api needs invoke or exec}"; shift 2
            case "$api" in invoke|exec) ;; *) echo "error: --api must be invoke or exec, not '$api'" >&2; exit 2 ;; esac ;;
        --model-only) takes model-only; model_only=true; shift ;;
        --dest) takes dest; dest="${2:?--dest needs a folder}"; shift 2 ;;
        *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
