"""Attention interpolation (AID / PAID): the maths against float64 references, then the control on every family."""

import math

import pytest
import torch
from PIL import Image

from attnctl import interpolation as maths
from attnctl.errors import ControlError

# -- interpolated attention ----------------------------------------------------------------------------------


def _qkv(rows=3, heads=2, sq=10, sk=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, sq, d, generator=g)
    ka, va, kb, vb = (torch.randn(rows, heads, sk, d, generator=g) for _ in range(4))
    ks, vs = torch.randn(rows, heads, sq, d, generator=g), torch.randn(rows, heads, sq, d, generator=g)
    return q, ka, va, kb, vb, ks, vs


def _attention64(q, k, v):
    weights = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v.double()


def test_inner_at_half_is_attention_on_averaged_keys_and_values():
    q, ka, va, kb, vb, _, _ = _qkv(seed=1)
    ours = maths.interpolated_attention(q, ka, va, kb, vb, torch.full((3,), 0.5), mode="inner")
    reference = _attention64(q, (ka.double() + kb.double()) / 2, (va.double() + vb.double()) / 2)
    assert (ours.double() - reference).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["inner", "outer"])
@pytest.mark.parametrize("fuse", [False, True])
def test_interpolated_attention_matches_float64_reference(mode, fuse):
    q, ka, va, kb, vb, ks, vs = _qkv(seed=2)
    t = torch.tensor([0.1, 0.5, 0.93])
    extra = dict(k_self=ks, v_self=vs) if fuse else {}
    ours = maths.interpolated_attention(q, ka, va, kb, vb, t, mode=mode, **extra)
    reference = maths.interpolated_attention_reference(q, ka, va, kb, vb, t, mode=mode, **extra)
    sdpa_error = (torch.nn.functional.scaled_dot_product_attention(q, ka, va).double() - _attention64(q, ka, va))
    assert ours.shape == q.shape
    assert (ours.double() - reference).abs().max() <= max(4 * sdpa_error.abs().max(), 2e-6)
    if not fuse:  # the reference itself against plain attention: outer is a blend of two attentions
        expected = ((1 - t.double()).reshape(-1, 1, 1, 1) * _attention64(q, ka, va) +
                    t.double().reshape(-1, 1, 1, 1) * _attention64(q, kb, vb))
        if mode == "outer":
            assert (reference - expected).abs().max() < 1e-12
        else:
            assert (reference - expected).abs().max() > 1e-3  # inner is not the blend


@pytest.mark.parametrize("mode", ["inner", "outer"])
def test_endpoints_are_plain_attention(mode):
    q, ka, va, kb, vb, _, _ = _qkv(rows=2, seed=3)
    out = maths.interpolated_attention(q, ka, va, kb, vb, torch.tensor([0.0, 1.0]), mode=mode)
    assert (out[0].double() - _attention64(q[:1], ka[:1], va[:1])[0]).abs().max() < 1e-5
    assert (out[1].double() - _attention64(q[1:], kb[1:], vb[1:])[0]).abs().max() < 1e-5


def test_fusion_with_own_keys_equal_to_an_endpoint_changes_nothing():
    """[K, K] with equal values is the same attention as K: a fused endpoint frame is its plain self."""
    q, ka, va, kb, vb, _, _ = _qkv(rows=1, sq=7, seed=4)
    fused = maths.interpolated_attention(q, ka, va, kb, vb, torch.zeros(1), mode="outer", k_self=ka, v_self=va)
    assert (fused.double() - _attention64(q, ka, va)).abs().max() < 1e-5


def test_mismatched_endpoint_lengths_are_an_error():
    q, ka, va, kb, vb, _, _ = _qkv()
    with pytest.raises(ControlError, match="different shapes.*cannot pad"):
        maths.interpolated_attention(q, ka, va, kb[:, :, :5], vb[:, :, :5], torch.zeros(3))
    with pytest.raises(ControlError, match="unknown interpolation mode 'middle'; allowed: inner, outer"):
        maths.interpolated_attention(q, ka, va, kb, vb, torch.zeros(3), mode="middle")


# -- Beta coefficients -----------------------------------------------------------------------------------------


def test_beta_cdf_against_closed_forms():
    x = torch.linspace(0, 1, 21, dtype=torch.float64)
    cases = [((1, 1), x), ((1, 3), 1 - (1 - x) ** 3), ((2, 1), x**2), ((0.5, 0.5), 2 / math.pi * torch.asin(x.sqrt())),
             ((2, 2), 3 * x**2 - 2 * x**3)]
    for (a, b), expected in cases:
        assert (maths.beta_cdf(x, a, b) - expected).abs().max() < 1e-12, (a, b)
    g = torch.Generator().manual_seed(0)
    a, b, x = torch.rand(50, generator=g) * 30 + 0.1, torch.rand(50, generator=g) * 30 + 0.1, torch.rand(50, generator=g)
    assert (maths.beta_cdf(x, a, b) + maths.beta_cdf(1 - x, b, a) - 1).abs().max() < 1e-10  # symmetry


def test_beta_quantiles():
    assert maths.beta_quantiles(2, 3, 3) == [0.0, 1.0]
    uniform = maths.beta_quantiles(5, 1, 1)
    assert max(abs(u - i / 4) for i, u in enumerate(uniform)) < 1e-8
    root = maths.beta_quantiles(6, 2, 1)  # CDF x^2 -> quantile sqrt(p)
    assert max(abs(r - math.sqrt(i / 5)) for i, r in enumerate(root)) < 1e-8
    crowded = maths.beta_quantiles(7, 25, 25)
    assert crowded[0] == 0.0 and crowded[-1] == 1.0 and all(a < b for a, b in zip(crowded, crowded[1:]))
    assert 0.4 < crowded[1] and crowded[-2] < 0.6  # alpha = beta > 1 crowds frames around the middle
    for bad in [(0, 1), (1, -2)]:
        with pytest.raises(ControlError, match="alpha > 0 and beta > 0"):
            maths.beta_quantiles(5, *bad)
    with pytest.raises(ControlError, match="at least 2 frames"):
        maths.beta_quantiles(1, 1, 1)


def test_fit_beta_recovers_parameters_and_evens_out_jumps():
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    alpha, beta = maths.fit_beta(t, maths.beta_cdf(t, 4.0, 1.5))
    assert abs(math.log(alpha / 4.0)) < 0.05 and abs(math.log(beta / 1.5)) < 0.05
    # A path whose change happens in a sharp step at t = 0.5: the fitted spacing crowds the middle.
    distances = [0.1, 0.1, 0.5, 3.0, 3.0, 0.5, 0.1, 0.1]
    alpha, beta = maths.fit_beta(t, maths.cumulative_distance(distances))
    assert alpha > 2 and beta > 2 and abs(math.log(alpha / beta)) < 0.2


# -- latents, distances, metrics, outputs -----------------------------------------------------------------------


def test_slerp():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.equal(maths.slerp(a, b, 0.0), a) and torch.equal(maths.slerp(a, b, 1.0), b)
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = maths.slerp(x, y, 0.5)
    assert torch.allclose(mid, torch.tensor([1.0, 1.0]) / math.sqrt(2))  # on the circle, not the chord
    assert torch.allclose(maths.slerp(x, 2 * x, 0.5), 1.5 * x)  # parallel: linear


def test_distances_and_sequence_metrics():
    white, black = Image.new("RGB", (16, 16), (255, 255, 255)), Image.new("RGB", (16, 16), (0, 0, 0))
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    assert maths.frame_distances([white, white], "lab") == [0.0]
    assert abs(maths.frame_distances([white, black], "lab")[0] - 100.0) < 1e-3  # L* from 100 to 0
    assert abs(maths.frame_distances([white, red], "lab")[0] - 114.6) < 0.5  # CIE76 white -> sRGB red
    noise = Image.effect_noise((16, 16), 60).convert("RGB")
    assert abs(maths.frame_distances([noise, noise], "ssim")[0]) < 1e-9
    assert maths.frame_distances([noise, white], "ssim")[0] > 0.5
    with pytest.raises(ControlError, match="unknown distance 'l2'"):
        maths.frame_distances([white, black], "l2")
    assert maths.smoothness([1.0, 1.0, 1.0]) == 1.0 and maths.consistency([1.0, 2.0, 3.0]) == 2.0
    assert maths.smoothness([0.0, 0.0, 3.0]) == pytest.approx(1 - 2 / 3)  # one jump holds everything
    assert maths.gini([0.0, 0.0]) == 0.0


def test_strip_and_gif():
    frames = [Image.new("RGB", (8, 6), (20 * i, 0, 0)) for i in range(4)]
    strip = maths.contact_strip(frames, gap=2)
    assert strip.size == (4 * 8 + 3 * 2, 6) and strip.getpixel((10, 0)) == (20, 0, 0)
    import io

    gif = Image.open(io.BytesIO(maths.gif_bytes(frames)))
    assert gif.format == "GIF" and gif.n_frames == 6  # forward, then back without repeating the ends
