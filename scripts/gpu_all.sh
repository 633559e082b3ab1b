#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command, for the day one is at hand (~10 min on one H100/H200):
# correctness first (scripts/gpu_check.py), then the GPU benchmarks; tables land in scripts/results/.
# Each step runs even if an earlier one failed; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")"
status=0
run() { echo "== $*"; timeout "${STEP_TIMEOUT:-900}" python "$@" || { echo "!! failed: $*"; status=1; }; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee results/gpu_card.txt
run gpu_check.py
run kernels_aot.py --out results/kernels_aot.txt
run bench_kernels.py --out results/bench_kernels_cuda.txt
run bench_block.py --preset opt-175b --tokens 32768 --dtype bf16
run bench_pack.py
run bench_prefetch.py --device cuda --out results/bench_prefetch_cuda.txt
run bench_sequential.py --out results/bench_sequential_cuda.txt
exit $status
