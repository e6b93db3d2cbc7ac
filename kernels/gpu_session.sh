#!/usr/bin/env bash
# One GPU lease, one call: the kernel's GPU tests, the engine's dispatch test and the benchmark.
# Run from the repository root on a CUDA machine:  bash kernels/gpu_session.sh [bench args...]
# Logs and JSON go to $OUT (the device tool's output folder) or ./out/gpu.
# Packages missing on the machine may travel as wheels in .whl/ (installed into /tmp/site first).
set -uo pipefail
OUT="${OUT:-$PWD/out/gpu}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/device.txt"
date -u +"%Y-%m-%dT%H:%M:%SZ" | tee -a "$OUT/device.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests/kernels -m gpu -q -p no:cacheprovider -rf --tb=short ${PYTEST_ARGS:-} \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -60
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 kernels/bench.py --json "$OUT/bench-bf16.json" "$@" 2>&1 | tee "$OUT/bench.log"
fi
