#!/usr/bin/env bash
# GPU smoke check for a machine with one NVIDIA GPU: installs nothing, takes under 10
# minutes (each stage has a time limit), and prints one table at the end.
#
#   1. which backends are here: the GPU, ONNX Runtime's CUDA provider (or the CPU wheel
#      shadowing it), TensorRT, torch;
#   2. the GPU-marked tests (ORT CUDA parity, TensorRT runner, generate and drafters end to
#      end on TensorRT; distillation and bf16 drafter training on torch's CUDA);
#   3. benchmarks/gpu.py at 1B and 7B shapes (cut to a few layers; needs onnxruntime-gpu and
#      a CPU torch to build the models).
#
#   bash benchmarks/gpu_check.sh          # PYTHON=... to pick the interpreter
#
# Exit status: 0 when every stage that could run passed, 1 otherwise, 2 without a GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=$(mktemp -d -t vispec-gpu-check.XXXXXX)

if ! "$PYTHON" -c "import vispec" 2>/dev/null; then
    echo "gpu_check: cannot import vispec with $PYTHON. Hint: set up first (bash samples/setup.sh)" >&2
    exit 2
fi
echo "== backends"
"$PYTHON" benchmarks/gpu.py --probe "$OUT/probe.json" || { rm -rf "$OUT"; exit 2; }

echo "== GPU-marked tests (at most 4 minutes): ORT CUDA, TensorRT, torch on CUDA"
timeout 240 "$PYTHON" -m pytest -q -m "gpu or torch_cuda" -rs -p no:cacheprovider \
    --junitxml="$OUT/tests.xml" tests
echo $? > "$OUT/tests.rc"

echo "== benchmarks/gpu.py 1b,7b (at most 5 minutes)"
if ! "$PYTHON" -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" 2>/dev/null; then
    echo "skipped: no ONNX Runtime CUDA provider" > "$OUT/bench.rc"
elif ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "skipped: no torch to build the models (a CPU torch is enough)" > "$OUT/bench.rc"
else
    timeout 300 "$PYTHON" benchmarks/gpu.py --models 1b,7b --layers-1b 8 --layers-7b 4 \
        --repeats 10 --past 512 --json "$OUT/gpu.json"
    echo $? > "$OUT/bench.rc"
fi

"$PYTHON" benchmarks/gpu.py --summary "$OUT"
echo "(probe, test and benchmark files in $OUT)"
grep -qvx 0 "$OUT/tests.rc" && exit 1
grep -qx "[1-9][0-9]*" "$OUT/bench.rc" && exit 1
exit 0
