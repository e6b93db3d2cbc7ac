#!/usr/bin/env bash
# One GPU lease, one call (at most ~8 minutes): the GPU tests (kernel, engine dispatch, every control in fp16/bf16
# against fp32: tests/test_gpu_controls.py), then the full-size benchmark (python -m attnctl.bench.fullsize).
# Run from the repository root on a CUDA machine:  bash kernels/gpu_session.sh
# Outputs go to $OUT (the device tool's output folder) or ./out/gpu, at most 7 files:
#   device.txt, gpu_tests.log, fullsize-bf16.json, fullsize.txt (the table), fullsize.log (+ with KERNEL_BENCH=1:
#   bench-bf16.json, bench.log).
# Environment: SKIP_TESTS=1, SKIP_FULLSIZE=1; KERNEL_BENCH=1 also runs the kernel micro-benchmark (kernels/bench.py,
#   given this script's arguments; its H100 results are in kernels/results/); TEST_TIMEOUT (default 170 s),
#   PYTEST_ARGS (default "-n 8"), FULLSIZE_TIMEOUT (250 s), FULLSIZE_BUDGET (210 s: the benchmark skips what is
#   left after that and still writes its JSON), FULLSIZE_ARGS (more options, e.g. "--variants sdxl,flux").
# DRY_RUN=1: the same steps on a CPU machine, the benchmark at tiny size (a check of this script, not a measure).
# Packages missing on the machine travel as wheels in .whl/ (kernels/gpu_wheels.sh fetches them; installed into
# /tmp/site first).
set -uo pipefail
OUT="${OUT:-$PWD/out/gpu}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null && [ "${DRY_RUN:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
PY="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
else
  echo "no nvidia-smi on this machine" | tee "$OUT/device.txt"
fi
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" | tee -a "$OUT/device.txt"
"$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$OUT/device.txt"
date -u +"%Y-%m-%dT%H:%M:%SZ" | tee -a "$OUT/device.txt"
echo "command: ${GPU_SESSION_COMMAND:-bash kernels/gpu_session.sh $*}" | tee -a "$OUT/device.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # -rfEP: the failures and the passing tests' printed errors (each control's error, SDPA's, the bound)
  timeout "${TEST_TIMEOUT:-170}" "$PY" -m pytest tests/kernels tests/test_gpu_controls.py -m gpu -q -p no:cacheprovider \
    -rfEP --tb=short --durations=10 ${PYTEST_ARGS:--n 8} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [ "${SKIP_FULLSIZE:-0}" != 1 ]; then
  if [ "${DRY_RUN:-0}" = 1 ]; then SIZE="--size tiny --device cpu --repeats 1 --warmup 0"; else SIZE="--size full --device cuda"; fi
  timeout "${FULLSIZE_TIMEOUT:-250}" "$PY" -m attnctl.bench.fullsize $SIZE --budget-s "${FULLSIZE_BUDGET:-210}" \
    --json "$OUT/fullsize-bf16.json" --table "$OUT/fullsize.txt" ${FULLSIZE_ARGS:-} 2>&1 | tee "$OUT/fullsize.log"
fi
if [ "${KERNEL_BENCH:-0}" = 1 ] && [ "${DRY_RUN:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-200}" "$PY" kernels/bench.py --json "$OUT/bench-bf16.json" "$@" 2>&1 | tee "$OUT/bench.log"
fi
ls -la "$OUT"
