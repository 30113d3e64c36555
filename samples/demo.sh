#!/usr/bin/env bash
# Set up, then run the end-to-end demo on SmolLM2-135M-Instruct with a trained vision tower
# (LLaVA-1.5): export -> validate against PyTorch -> the shipped ViSpec, HiViS and EAGLE
# drafters (without shipped ones, or with --train: self-distilled here, ~15 min, cached) ->
# plain vs speculative decoding timed as `bench` times it, speed table and chart
# (demo_out/speedup.png).
# `vispec-export demo --tiny` runs the same flow on a tiny random model in seconds.
# Usage: bash samples/demo.sh [OUT_DIR [DEMO_OPTIONS...]]   (default: demo_out/ in the
# repository, replaced on every run; an OUT_DIR you name must not exist yet, unless you add
# --overwrite to replace an earlier demo output there; options go to `vispec-export demo`)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -gt 0 ]; then
    case "$1" in /*) out="$1" ;; *) out="$PWD/$1" ;; esac  # relative to the caller's folder
    shift
    options=("$@")
else
    out="$root/demo_out"
    options=(--overwrite)
fi
cd "$root"
bash samples/setup.sh
vispec-export demo "$out" ${options[@]+"${options[@]}"}
