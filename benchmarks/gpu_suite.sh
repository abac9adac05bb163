#!/usr/bin/env bash
# Everything of this project that needs an NVIDIA GPU, in one run sized for a lent GPU machine
# (it has torch, triton, transformers, pytest and matplotlib, but no vLLM):
#   1. the Triton kernel tests (tests/kernels/test_triton_gpu.py, skipped without a GPU) and the
#      custom-op tests;
#   2. benchmarks/kernel_bench.py, SmolLM2 shapes, then 7B Llama shapes (one run each, so that a
#      timeout loses one half only);
#   3. benchmarks/decode_bench.py, the PyTorch decode loop that stands in for vLLM there
#      (SmolLM2 and an 8-layer 7B Llama).
# Each step has its own time limit and the next runs even if one fails. Results, with the GPU's
# name in their file names, and the whole log go to $OUT (default benchmarks/results):
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh
# QUICK=1 passes --quick to both benchmarks (a smoke run of this script, also on a CPU).
# Then copy the JSON/PNG files into benchmarks/results/ and the figures into the README.
# The compressor's GPU checks are benchmarks/gpu_compress.sh (a second run: together they pass the
# ten minutes one device command may take).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
py=${PYTHON:-python3}
quick=${QUICK:+--quick}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
source benchmarks/gpu_steps.sh
{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || echo "no nvidia-smi"
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    step 240 "$py" -m pytest -q -ra -p no:cacheprovider tests/kernels/test_triton_gpu.py tests/kernels/test_lowrank_ops.py \
        --junitxml "$out/gpu_tests.xml"
    step 150 "$py" -m benchmarks.kernel_bench --models smollm2-135m $quick --out-dir "$out/kernel_smollm2"
    step 150 "$py" -m benchmarks.kernel_bench --models llama-7b $quick --out-dir "$out/kernel_llama7b"
    step 180 "$py" -m benchmarks.decode_bench --llama-layers 8 $quick --out-dir "$out"
} 2>&1 | tee "$out/gpu_suite.log"
