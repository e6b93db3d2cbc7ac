"""The Triton perturbed-attention kernel under TRITON_INTERPRET=1, against a float64 reference.

Every case draws fresh random inputs, fills the output with NaN before the launch (an element the kernel
forgets to write fails), and checks two bounds: relative error (float32: < 1e-5) and the accuracy
rule, max abs error at most 2x that of PyTorch SDPA (``sdpa_blend``) in the same dtype, both against float64.
Sizes are small: the interpreter runs each program in Python (bf16 dots are wrong in triton 3.9's
interpreter, so bf16 is covered by the GPU tests only).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnctl.kernels.baselines import sdpa_blend
from attnctl.kernels.perturbed import launch_perturbed_attention
from attnctl.kernels.reference import perturbed_attention_ref

pytestmark = pytest.mark.interpret

U_LEVELS = (0.0, 0.3, 1.0)


def random_qkv(B, H, Sq, Sk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Scale 1.5 spreads the scores (std ~1.5^2) so softmaxes are peaked, not near-uniform.
    q, k, v = (1.5 * torch.randn(B, H, s, D, generator=g) for s in (Sq, Sk, Sk))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def mixed_u(B, H):
    """(B, H) with 0, 0.3 and 1 mixed across rows and heads (every level present when B * H >= 3)."""
    idx = torch.arange(B)[:, None] + torch.arange(H)[None, :]
    return torch.tensor(U_LEVELS)[idx % 3]


def upcast(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    return x


def run_and_check(q, k, v, u=None, *, rel_tol, block_m=None, block_n=None, **extra):
    """Launch into a NaN-poisoned output, compare with the float64 reference and with SDPA's own error."""
    out = torch.full_like(q, float("nan"))
    launch_perturbed_attention(q, k, v, u, out=out, block_m=block_m, block_n=block_n, **extra)
    assert not torch.isnan(out).any(), "some output elements were never written (or are NaN)"
    ref = perturbed_attention_ref(upcast(q), upcast(k), upcast(v), u, **{n: upcast(t) for n, t in extra.items()})
    err = (out.double() - ref).abs().max().item()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    sdpa = sdpa_blend(q, k, v, u, **extra)
    sdpa_err = (sdpa.double() - ref).abs().max().item()
    assert rel < rel_tol, f"relative error {rel:.3g} >= {rel_tol}"
    assert err <= 2 * sdpa_err, f"max abs error {err:.3g} > 2x SDPA's {sdpa_err:.3g}"
    return out, ref


@pytest.mark.parametrize(
    "mode, B, H, S, D, text_range",
    [
        ("full", 3, 2, 100, 40, None),  # SD1.5's odd head_dim, padded to 64
        ("image", 3, 2, 100, 64, (64, 100)),  # SD3 layout: [image; text]
        ("image", 3, 1, 77, 16, (0, 23)),  # FLUX layout: [text; image]
    ],
)
def test_matches_reference_fp32(interpreter, mode, B, H, S, D, text_range):
    q, k, v = random_qkv(B, H, S, S, D, torch.float32, seed=hash((mode, S, D)) % 2**31)
    run_and_check(q, k, v, mixed_u(B, H), mode=mode, text_range=text_range, rel_tol=1e-5)


def test_long_ragged_sequence(interpreter):
    """333 tokens (SD3's text length): 11 key blocks of 32 with a ragged tail, text span cut mid-block."""
    q, k, v = random_qkv(3, 1, 333, 333, 16, torch.float32, seed=11)
    run_and_check(q, k, v, mixed_u(3, 1), mode="image", text_range=(250, 333), rel_tol=1e-5)


@pytest.mark.parametrize("u", [None, "zeros"])
def test_cross_attention(interpreter, u):
    """Sq != Sk (image queries, 77 text keys): plain attention; u = 0 is accepted."""
    q, _, _ = random_qkv(2, 2, 100, 1, 64, torch.float32, seed=3)
    _, k, v = random_qkv(2, 2, 1, 77, 64, torch.float32, seed=4)
    run_and_check(q, k, v, None if u is None else torch.zeros(2, 2), rel_tol=1e-5)


@pytest.mark.parametrize("mode, text_range", [("full", None), ("image", (50, 77))])
def test_key_bias_and_regions(interpreter, mode, text_range):
    B, H, S = 2, 2, 77
    q, k, v = random_qkv(B, H, S, S, 40, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    key_bias = torch.randn(B, 1, S, generator=g)  # broadcast over heads
    query_region = torch.randint(0, 3, (B, S), generator=g, dtype=torch.int32)
    key_region = torch.randint(-1, 3, (1, S), generator=g, dtype=torch.int32)  # broadcast over the batch
    key_region[0, :4] = -1  # every query sees some key: SDPA (the comparator) gives NaN on empty rows
    u = torch.tensor([[0.3, 1.0], [0.0, 0.3]])
    out, ref = run_and_check(q, k, v, u, mode=mode, text_range=text_range, key_bias=key_bias,
                             query_region=query_region, key_region=key_region, rel_tol=1e-5)
    # The masks must matter, or the test proves nothing about them.
    unmasked = perturbed_attention_ref(q.double(), k.double(), v.double(), u, mode=mode, text_range=text_range)
    assert (unmasked - ref).abs().max() > 0.1


def test_fp16(interpreter):
    q, k, v = random_qkv(3, 1, 100, 100, 64, torch.float16, seed=7)
    run_and_check(q, k, v, mixed_u(3, 1), mode="image", text_range=(70, 100), rel_tol=1e-2)


@pytest.mark.parametrize("block_m, block_n", [(16, 64), (64, 16)])
def test_other_tilings(interpreter, block_m, block_n):
    """Text span (37, 77) starts and ends mid-block for both tilings: head, interior and tail blocks."""
    q, k, v = random_qkv(3, 1, 77, 77, 32, torch.float32, seed=block_m)
    run_and_check(q, k, v, mixed_u(3, 1), mode="image", text_range=(37, 77), rel_tol=1e-5,
                  block_m=block_m, block_n=block_n)


def test_identity_rows_never_read_q_or_k(interpreter):
    """Mode "full", u == 1: the program returns V without touching Q or K (NaN there cannot leak)."""
    q, k, v = random_qkv(3, 2, 64, 64, 16, torch.float32, seed=8)
    u = torch.tensor([[0.0, 0.3], [1.0, 1.0], [0.3, 0.0]])
    q[1] = float("nan")
    k[1] = float("nan")
    out = torch.full_like(q, float("nan"))
    launch_perturbed_attention(q, k, v, u, out=out)
    assert torch.equal(out[1], v[1])
    ref = perturbed_attention_ref(q[[0, 2]].double(), k[[0, 2]].double(), v[[0, 2]].double(), u[[0, 2]])
    assert ((out[[0, 2]].double() - ref).norm() / ref.norm()).item() < 1e-5


def test_rows_with_every_key_hidden_are_zero(interpreter):
    q, k, v = random_qkv(1, 2, 40, 40, 16, torch.float32, seed=9)
    query_region = torch.zeros(1, 40, dtype=torch.int32)
    query_region[0, :10] = 5  # region 5 owns no key and no key is shared (-1): nothing to attend
    key_region = torch.zeros(1, 40, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    launch_perturbed_attention(q, k, v, out=out, query_region=query_region, key_region=key_region)
    assert torch.equal(out[:, :, :10], torch.zeros_like(out[:, :, :10]))
    ref = perturbed_attention_ref(q.double(), k.double(), v.double(), query_region=query_region,
                                  key_region=key_region)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_strided_bshd_views(interpreter):
    """diffusers' FLUX path keeps (B, S, H, D): transposed views in, the same layout out, no copies needed."""
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 50, 3, 16, generator=g).transpose(1, 2) for _ in range(3))
    u = mixed_u(2, 3)
    out = launch_perturbed_attention(q, k, v, u, mode="image", text_range=(0, 20))
    assert out.stride() == q.stride()
    ref = perturbed_attention_ref(q.double(), k.double(), v.double(), u, mode="image", text_range=(0, 20))
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_random_configurations(interpreter):
    """A few random shapes, modes, text spans and u values (seeded: the same draws on every run)."""
    g = torch.Generator().manual_seed(12)
    for trial in range(4):
        S = int(torch.randint(16, 90, (1,), generator=g))
        D = [16, 24, 40][trial % 3]
        mode = ["full", "image"][trial % 2]
        a, b = sorted(torch.randint(0, S + 1, (2,), generator=g).tolist())
        u = torch.rand(2, 2, generator=g).round(decimals=1)
        q, k, v = random_qkv(2, 2, S, S, D, torch.float32, seed=100 + trial)
        text_range = (a, b) if mode == "image" else None
        run_and_check(q, k, v, u, mode=mode, text_range=text_range, rel_tol=1e-5)


def _interpreter_in_process() -> bool:
    """Same check as conftest.interpreter_in_process (conftest modules are not importable by name)."""
    try:
        import triton.language.standard as standard
    except ImportError:
        return False
    return type(standard.zeros).__name__ == "InterpretedFunction"


def test_interpreter_suite_in_fresh_process():
    """When triton was imported before TRITON_INTERPRET could be set (e.g. by diffusers in an earlier test
    module), run this file's interpreter tests in a fresh process where the variable is set first."""
    if _interpreter_in_process() or os.environ.get("ATTNCTL_KERNEL_TEST_CHILD"):
        pytest.skip("the interpreter tests run in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", ATTNCTL_KERNEL_TEST_CHILD="1")
    here = Path(__file__)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(here.parent), "-q", "-p", "no:cacheprovider", "-m", "interpret",
         "-k", "not fresh_process"],
        cwd=here.parents[2], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]
