"""The compiled kernel on a CUDA GPU (skipped without one): half precision, autotuned tiles, larger shapes.

Same checks as the interpreter tests: NaN-poisoned output, float64 reference, relative error bound, and max
abs error at most 2x that of PyTorch SDPA (``sdpa_blend``) in the same dtype. Run with ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from attnctl.kernels.baselines import sdpa_blend
from attnctl.kernels.perturbed import is_available, launch_perturbed_attention
from attnctl.kernels.reference import perturbed_attention_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def random_qkv(B, H, Sq, Sk, D, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [(1.5 * torch.randn(B, H, s, D, generator=g, device=DEV)).to(dtype) for s in (Sq, Sk, Sk)]


def mixed_u(B, H):
    idx = torch.arange(B)[:, None] + torch.arange(H)[None, :]
    return torch.tensor([0.0, 0.3, 1.0])[idx % 3].to(DEV)


def upcast(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def check(q, k, v, u=None, *, rel_tol, block_m=None, block_n=None, **extra):
    assert is_available(q)
    out = torch.full_like(q, float("nan"))
    launch_perturbed_attention(q, k, v, u, out=out, block_m=block_m, block_n=block_n, **extra)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN output elements"
    ref = perturbed_attention_ref(upcast(q), upcast(k), upcast(v), u, **{n: upcast(t) for n, t in extra.items()})
    err = (out.double() - ref).abs().max().item()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    sdpa_err = (sdpa_blend(q, k, v, u, **extra).double() - ref).abs().max().item()
    assert rel < rel_tol, f"relative error {rel:.3g} >= {rel_tol}"
    assert err <= 2 * sdpa_err, f"max abs error {err:.3g} > 2x SDPA's {sdpa_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "mode, S, D, text_range",
    [
        ("full", 1024, 64, None),  # SDXL-like self-attention
        ("full", 1000, 40, None),  # SD1.5 odd head_dim, ragged length
        ("full", 333, 160, None),  # head_dim 160 -> 256-wide tiles
        ("image", 1024 + 77, 64, (1024, 1101)),  # SD3 layout [image; text]
        ("image", 128 + 1024, 128, (0, 128)),  # FLUX layout [text; image]
    ],
)
def test_half_precision_autotuned(dtype, mode, S, D, text_range):
    q, k, v = random_qkv(3, 4, S, S, D, dtype, seed=S + D)
    check(q, k, v, mixed_u(3, 4), mode=mode, text_range=text_range, rel_tol=1e-2)


def test_float32_is_ieee_not_tf32():
    q, k, v = random_qkv(3, 2, 777, 777, 64, torch.float32, seed=1)
    check(q, k, v, mixed_u(3, 2), mode="image", text_range=(700, 777), rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_attention(dtype):
    q, _, _ = random_qkv(3, 4, 1024, 1, 64, dtype, seed=2)
    _, k, v = random_qkv(3, 4, 1, 77, 64, dtype, seed=3)
    check(q, k, v, torch.zeros(3, 4, device=DEV), rel_tol=1e-2)


@pytest.mark.parametrize("mode, text_range", [("full", None), ("image", (512, 589))])
def test_bias_and_regions(mode, text_range):
    B, H, S = 2, 4, 589
    q, k, v = random_qkv(B, H, S, S, 64, torch.bfloat16, seed=4)
    g = torch.Generator(device=DEV).manual_seed(5)
    key_bias = torch.randn(B, 1, S, generator=g, device=DEV)
    query_region = torch.randint(0, 3, (B, S), generator=g, device=DEV, dtype=torch.int32)
    key_region = torch.randint(-1, 3, (1, S), generator=g, device=DEV, dtype=torch.int32)
    key_region[0, :8] = -1
    check(q, k, v, mixed_u(B, H), mode=mode, text_range=text_range, key_bias=key_bias,
          query_region=query_region, key_region=key_region, rel_tol=1e-2)


@pytest.mark.parametrize("block_m, block_n", [(64, 32), (128, 128), (16, 16)])
def test_fixed_tilings(block_m, block_n):
    q, k, v = random_qkv(3, 2, 700, 700, 64, torch.float16, seed=block_m + block_n)
    check(q, k, v, mixed_u(3, 2), mode="image", text_range=(600, 700), rel_tol=1e-2, block_m=block_m,
          block_n=block_n)


def test_identity_rows_never_read_q_or_k():
    """u == 1 in mode "full": NaN in that row's Q and K cannot reach the output, which is exactly V."""
    q, k, v = random_qkv(3, 4, 1024, 1024, 64, torch.bfloat16, seed=6)
    u = torch.tensor([[0.0] * 4, [0.3] * 4, [1.0] * 4], device=DEV)
    q[2] = float("nan")
    k[2] = float("nan")
    out = launch_perturbed_attention(q, k, v, u)
    torch.cuda.synchronize()
    assert torch.equal(out[2], v[2])
    assert torch.isfinite(out).all()
