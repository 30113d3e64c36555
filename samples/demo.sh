#!/usr/bin/env bash
# Set up, then run the end-to-end demo on a tiny LLaVA model built on this machine:
# export -> validate against PyTorch -> generate (plain and speculative).
set -euo pipefail
cd "$(dirname "$0")/.."
bash samples/setup.sh
vispec-export demo "${1:-demo_out}" --overwrite
