#!/usr/bin/env bash
# Install vispec-export with export + test extras. torch is pinned to the CPU wheel:
# an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[export,dev]"
