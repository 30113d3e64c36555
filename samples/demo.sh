#!/usr/bin/env bash
# Set up, then run the end-to-end demo on a tiny LLaVA model built on this machine:
# export -> validate against PyTorch -> generate (plain and speculative).
# Usage: bash samples/demo.sh [OUT_DIR]   (default: demo_out/ in the repository, replaced
# on every run; an OUT_DIR you name must not exist yet)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -gt 0 ]; then
    case "$1" in /*) out="$1" ;; *) out="$PWD/$1" ;; esac  # relative to the caller's folder
    replace=()
else
    out="$root/demo_out"
    replace=(--overwrite)
fi
cd "$root"
bash samples/setup.sh
vispec-export demo "$out" ${replace[@]+"${replace[@]}"}
