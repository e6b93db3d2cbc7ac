#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels a bare GPU machine lacks for kernels/gpu_session.sh (Python 3.12,
# x86-64; the device image has torch, triton, transformers, accelerate, huggingface_hub, safetensors, numpy, pillow,
# pyyaml, regex, requests, filelock, pytest, pytest-xdist, but no diffusers and no pydantic). They land in .whl/
# (git-ignored); name .whl in the device call's `carry`. Versions: the ones the project's tests pass with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 "$@"
