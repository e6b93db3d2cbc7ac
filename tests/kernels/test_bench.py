"""The kernel benchmark's pieces on the CPU: every method that claims to compute the perturbed function does,
and without a GPU the benchmark stops with a clear message (timing itself needs CUDA and is never tested)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnctl.errors import ControlError
from attnctl.kernels import bench
from attnctl.kernels.reference import perturbed_attention_ref

CASES = [
    bench.KernelShape("image-soft", 3, 4, 64, 64, 32, "image", (40, 64), "soft"),
    bench.KernelShape("image-pag", 3, 4, 64, 64, 32, "image", (0, 20), "pag"),
    bench.KernelShape("full-pag", 3, 4, 64, 64, 32, "full", None, "pag"),
    bench.KernelShape("full-soft", 3, 4, 64, 64, 32, "full", None, "soft"),
]


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape.B, shape.H, s, shape.D, generator=g) for s in (shape.Sq, shape.Sk, shape.Sk)]


def _check(shape, names, seed):
    q, k, v = _inputs(shape, seed)
    u = shape.u("cpu")
    ref = perturbed_attention_ref(q.double(), k.double(), v.double(), u, mode=shape.mode, text_range=shape.text)
    methods = bench._make_methods(shape, q, k, v, u)
    for name in names:
        out = methods[name]()
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-5, f"{shape.name} {name}: relative error {rel:.3g}"


@pytest.mark.interpret
@pytest.mark.parametrize("shape", CASES, ids=lambda s: s.name)
def test_methods_compute_the_same_function(interpreter, shape):
    _check(shape, ["sdpa+blend", "sdpa+separate", "attnctl"], seed=len(shape.name))


@pytest.mark.slow
@pytest.mark.parametrize("shape", CASES[:2], ids=lambda s: s.name)
def test_flex_method_computes_the_same_function(shape):
    """Compiled FlexAttention on the CPU (about 30 s of compilation per case on 2 cores)."""
    _check(shape, ["flex"], seed=1)


def test_shape_u_patterns():
    assert bench.SHAPES["sd3-joint-4429-pag"].u("cpu")[-1].eq(1).all()
    soft = bench.SHAPES["flux-joint-4608-softpag"].u("cpu")
    assert soft[:2].eq(0).all() and soft[2, :12].eq(0.5).all() and soft[2, 12:].eq(0).all()
    assert bench.SHAPES["flux-joint-4608-plain"].u("cpu").eq(0).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_without_cuda_the_benchmark_says_a_gpu_is_needed():
    with pytest.raises(ControlError, match="needs a CUDA GPU"):
        bench.run_kernel_bench()
    script = Path(__file__).parents[2] / "kernels" / "bench.py"
    results = script.parent / "results"
    before = sorted(results.iterdir()) if results.exists() else None
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr
    assert (sorted(results.iterdir()) if results.exists() else None) == before  # nothing written on CPU


def test_unknown_shape_is_a_clear_error():
    with pytest.raises(ControlError, match="unknown shape"):
        bench._resolve("flux-joint-4069-pag")
