#!/usr/bin/env bash
# The Pallas GPU lightning kernels on an NVIDIA GPU, in one go: the lightning tests compiled on the GPU
# (the GPU kernels' own, and the public API dispatching to them), then tools/bench_lightning.py at
# M1's shapes (batch 1, 64 heads x 128, bf16, 16k and 64k tokens; decode at batch 64) beside
# flash-linear-attention (`pip install flash-linear-attention` first), after a sweep of kernel variants at
# 64k tokens: both forwards, the chunk scan (the default) and the split forward (state pass + output pass)
# with a few of its tiles, each timed against fla (bench.log's summary: <variant>_over_fla_65536_fwd).
# Logs, the GPU's description and bench.json go to OUTDIR.
#
#   tools/gpu_lightning_check.sh OUTDIR [extra bench_lightning.py flags, e.g. --peak-tbps 4.8]
#   VARIANTS=c64-t32-w4-s2,split-c64-n2 tools/gpu_lightning_check.sh OUTDIR   # another sweep
set -uo pipefail
out=${1:?usage: tools/gpu_lightning_check.sh OUTDIR [bench flags]}
shift
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
py=${PYTHON:-python3}
# scan: the default kernel; split: defaults (state tile 64 x 32, output tile 128, one chunk per output
# program), the state saved every 2 chunks, output tile 64, state tile 64 x 64, 8 warps
variants=${VARIANTS:-c64-t32-w4-s2,split-c64-t32-k64-o128-n1-w4-s2,split-c64-t32-k64-o128-n2-w4-s2,\
split-c64-t32-k64-o64-n1-w4-s2,split-c64-t64-k64-o128-n1-w4-s2,split-c64-t32-k64-o128-n1-w8-s2}

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
  --variants "$variants" --out "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log"
