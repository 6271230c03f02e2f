#!/usr/bin/env bash
# The Pallas GPU lightning kernels on an NVIDIA GPU, in one go: the lightning tests compiled on the GPU
# (the GPU kernels' own, and the public API dispatching to them), then tools/bench_lightning.py at
# M1's shapes (batch 1, 64 heads x 128, bf16, 16k and 64k tokens; decode at batch 64) beside
# flash-linear-attention (`pip install flash-linear-attention` first); with --variants, after a sweep of
# the kernel's chunk / tile / warps / stages. Logs, the GPU's description and bench.json go to OUTDIR.
#
#   tools/gpu_lightning_check.sh OUTDIR [extra bench_lightning.py flags, e.g. --peak-tbps 4.8 --variants ...]
set -uo pipefail
out=${1:?usage: tools/gpu_lightning_check.sh OUTDIR [bench flags]}
shift
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
py=${PYTHON:-python3}

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  lscpu | grep -E "^Model name|^CPU\(s\)"
  "$py" -c "import jax, torch, triton; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, 'triton', triton.__version__)"
  "$py" -c "import fla; print('fla', fla.__version__)"
} 2>&1 | tee "$out/machine.txt"

"$py" -m pytest -q -p no:cacheprovider tests/pallas_kernels/lightning/test_lightning_pallas_gpu.py \
  tests/pallas_kernels/lightning/test_lightning_impls.py::test_prefill_then_decode_equals_one_call \
  tests/pallas_kernels/lightning/test_lightning_api.py \
  -k "not xla" 2>&1 | tee "$out/tests.log"

"$py" tools/bench_lightning.py --lengths 16384,65536 --heads 64 --head-dim 128 --dtype bfloat16 --blocks 256 \
  --reference-max 0 --softmax-max 0 --fla --decode-batch 64 --warmup 2 --inner 5 --repeats 5 \
  --out "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log"
