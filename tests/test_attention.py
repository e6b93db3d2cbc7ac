"""The attention math against explicit float64 softmax references on fresh random inputs."""

import pytest
import torch

from attnctl.attention import AttentionRequest, attend, key_probabilities


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _softmax_ref(q, k, v, bias=None):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(-1)
    return probs, probs @ v


@pytest.mark.parametrize("seed", [0, 1])
def test_key_probabilities_match_softmax_in_chunks(seed):
    q, k = _rand(2, 3, 50, 8, seed=seed), _rand(2, 3, 60, 8, seed=seed + 10)
    bias = _rand(1, 1, 50, 60, seed=seed + 20)
    probs, _ = _softmax_ref(q, k, k, bias)
    got = key_probabilities(q, k, [5, 0, 59], bias=bias, chunk=7)
    torch.testing.assert_close(got, probs[..., [5, 0, 59]], atol=1e-12, rtol=1e-10)


def test_key_probabilities_read_a_boolean_bias_as_a_mask():
    """A processor's own key mask (True = may attend; Z-Image and Qwen-Image pass one when rows differ in length)
    reaches map captures unchanged: it masks, as in SDPA, rather than adding 1 to the kept scores."""
    q, k = _rand(2, 3, 10, 8, seed=1), _rand(2, 3, 12, 8, seed=2)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[1, ..., 9:] = False  # row 1's last three keys are padding
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    probs, _ = _softmax_ref(q, k, k, additive)
    got = key_probabilities(q, k, [0, 4, 10], bias=mask, chunk=4)
    torch.testing.assert_close(got, probs[..., [0, 4, 10]], atol=1e-12, rtol=1e-10)
    assert bool((got[1, ..., 2] == 0).all())


def test_softpag_blend_per_head_float64():
    q, k, v = (_rand(3, 4, 20, 8, seed=s) for s in (1, 2, 3))
    u = torch.tensor([[0.0] * 4, [0.0] * 4, [1.0, 0.3, 0.0, 0.7]], dtype=torch.float64)
    out = attend(AttentionRequest(q, k, v, u=u))
    _, plain = _softmax_ref(q, k, v)
    expected = (1 - u[..., None, None]) * plain + u[..., None, None] * v
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    # u = 0 equals no perturbation, u = 1 equals the identity map (output = V)
    torch.testing.assert_close(out[:2], plain[:2], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[2, 0], v[2, 0], atol=1e-12, rtol=0)


def test_full_rows_at_u1_skip_softmax_and_stay_finite():
    q, k, v = (_rand(2, 2, 10, 8, seed=s) for s in (4, 5, 6))
    q[1] = float("nan")  # a u = 1 row must never read its queries
    out = attend(AttentionRequest(q, k, v, u=torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], v[1])


@pytest.mark.parametrize("text", [slice(8, 12), slice(0, 4), slice(3, 7)], ids=["sd3", "flux", "middle"])
@pytest.mark.parametrize("bias_shape", [None, (1, 2, 12, 12), (1, 1, 1, 12)], ids=str)
def test_image_only_identity_keeps_text(text, bias_shape):
    """Mode "image" (computed from the image->text block and the diagonal, no S x S mask) equals a dense
    masked softmax: text rows see everything, image rows see the text keys and themselves; a bias (regions)
    is added to exactly the scores kept."""
    seq = 12  # SD3 puts text after the image tokens, FLUX before; a middle span takes the index-tensor path
    q, k, v = (_rand(1, 2, seq, 8, seed=s) for s in (7, 8, 9))
    extra = None if bias_shape is None else _rand(*bias_shape, seed=10)
    u = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    out = attend(AttentionRequest(q, k, v, bias=extra, u=u, mode="image", text=text))
    allowed = torch.zeros(seq, seq, dtype=torch.bool)
    allowed[:, text] = True
    allowed |= torch.eye(seq, dtype=torch.bool)
    allowed[text, :] = True
    bias = torch.zeros(seq, seq, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    _, perturbed = _softmax_ref(q, k, v, bias if extra is None else bias + extra)
    _, plain = _softmax_ref(q, k, v, extra)
    expected = (1 - u[..., None, None]) * plain + u[..., None, None] * perturbed
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out[:, :, text], plain[:, :, text], atol=1e-12, rtol=0)  # text rows untouched


def test_identity_needs_one_sequence():
    q, k = _rand(1, 1, 4, 8, seed=1), _rand(1, 1, 6, 8, seed=2)
    with pytest.raises(Exception, match="one sequence"):
        attend(AttentionRequest(q, k, k, u=torch.ones(1, 1, dtype=torch.float64)))


def test_forced_unknown_backend_is_an_error(monkeypatch):
    q = _rand(1, 1, 4, 8, seed=1)
    monkeypatch.setenv("ATTNCTL_BACKEND", "nope")
    with pytest.raises(Exception, match="unknown attention backend 'nope'"):
        attend(AttentionRequest(q, q, q))
