"""NAG (attnctl.controls.nag): the formula against a float64 reference, each family's attention call against an
explicit float64 computation from the module's own weights, s = 0 equals no control, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import attnctl
from attnctl.controls.nag import Nag, normalized_guidance
from attnctl.errors import ControlError, SelectorError
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

NEGATIVE = "blue square"
PROMPT = "a red circle"


def nag_reference(pos: torch.Tensor, neg: torch.Tensor, s: float, tau: float, alpha: float, p: int) -> torch.Tensor:
    """The paper's formula on (B, S, C) in float64, written out per token."""
    pos, neg = pos.double(), neg.double()
    out = torch.empty_like(pos)
    for b in range(pos.shape[0]):
        for t in range(pos.shape[1]):
            zp, zn = pos[b, t], neg[b, t]
            z = zp + s * (zp - zn)
            ratio = z.abs().pow(p).sum().pow(1 / p) / zp.abs().pow(p).sum().pow(1 / p)
            if ratio > tau:
                z = z * tau / ratio
            out[b, t] = alpha * z + (1 - alpha) * zp
    return out


def attention64(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64; q/k/v (B, H, S, D)."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def heads(x, n):
    """(B, S, H*D) -> (B, H, S, D)."""
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def merge(x):
    """(B, H, S, D) -> (B, S, H*D)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


@pytest.mark.parametrize("norm,p", [("l1", 1), ("l2", 2)])
def test_formula_matches_float64_reference_in_head_layout(norm, p):
    torch.manual_seed(0)
    pos = torch.randn(2, 3, 5, 4)  # (B, H, S, D)
    neg = pos + 0.8 * torch.randn(2, 3, 5, 4)
    for s, tau in [(4.0, 2.5), (0.5, 2.5), (4.0, 1.01)]:  # cap active on most tokens, on none, on all
        got = normalized_guidance(pos, neg, s, tau, 0.25, norm, channel_dims=(1, 3))
        want = nag_reference(merge(pos), merge(neg), s, tau, 0.25, p)
        torch.testing.assert_close(merge(got).double(), want, rtol=1e-6, atol=1e-6)
    capped = normalized_guidance(pos, neg, 4.0, 1.01, 1.0, norm, channel_dims=(1, 3))
    ratio = torch.linalg.vector_norm(capped, ord=p, dim=(1, 3)) / torch.linalg.vector_norm(pos, ord=p, dim=(1, 3))
    assert float(ratio.max()) <= 1.01 + 1e-5  # alpha = 1: the cap bounds the norm ratio at tau


def _capped_share(pos, neg, s, tau):
    """Share of tokens (B, S, C) whose L1 ratio ||Z~|| / ||Z+|| exceeds tau."""
    guided = pos + s * (pos - neg)
    return float((guided.abs().sum(-1) / pos.abs().sum(-1) > tau).double().mean())


def _record(module):
    """Forward hooks recording (inputs, output) of every call of an attention module."""
    calls = []

    def hook(mod, args, kwargs, out):
        inputs = dict(kwargs)
        if args:
            inputs["hidden_states"] = args[0]
        calls.append((inputs, out))

    return calls, module.register_forward_hook(hook, with_kwargs=True)


def _run(pipe, family, controls, steps=1, **overrides):
    with attnctl.apply(pipe, controls) as session:
        out = pipe(PROMPT, **tiny_call_kwargs(family, steps=steps, **overrides)).images
    return out, session


def test_unet_cross_attention_call_matches_explicit_float64():
    pipe = tiny_pipeline("sd15")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    module = pipe.unet.get_submodule(name)
    calls, handle = _record(module)
    opts = dict(negative_prompt=NEGATIVE, scale=3.0, tau=1.5, alpha=0.5)
    try:
        _run(pipe, "sd15", [Nag(**opts)])
    finally:
        handle.remove()
    inputs, out = calls[0]  # step 0, CFG batch [uncond; cond]
    ref = copy.deepcopy(module).double()
    x, text = inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double()
    negative = pipe.encode_prompt(NEGATIVE, "cpu", 1, False)[0].double()
    q = heads(ref.to_q(x), ref.heads)
    z_plus = merge(attention64(q, heads(ref.to_k(text), ref.heads), heads(ref.to_v(text), ref.heads)))
    z_minus = merge(attention64(q[1:], heads(ref.to_k(negative), ref.heads), heads(ref.to_v(negative), ref.heads)))
    z = z_plus.clone()
    z[1:] = nag_reference(z_plus[1:], z_minus, 3.0, 1.5, 0.5, 1)  # only the cond row is guided
    want = ref.to_out[0](z)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    assert (z[1:] - z_plus[1:]).abs().max() > 1e-3  # the guidance did something on this call
    assert _capped_share(z_plus[1:], z_minus, 3.0, 1.5) > 0.1  # the cap is exercised on this call


def test_sd3_joint_attention_call_matches_explicit_float64():
    """Block 0's joint attention: image queries over [image; prompt text] and over [image; negative text]
    (the negative stream at block 0 is the context embedder's output for the negative prompt's embeddings)."""
    pipe = tiny_pipeline("sd3")
    module = pipe.transformer.transformer_blocks[0].attn
    calls, handle = _record(module)
    try:
        _run(pipe, "sd3", [Nag(negative_prompt=NEGATIVE, scale=3.0, tau=1.05, alpha=0.5)])
    finally:
        handle.remove()
    (neg_inputs, _), (inputs, out) = calls[0], calls[1]  # the negative pass runs first, on the cond row only
    assert neg_inputs["hidden_states"].shape[0] == 1 and inputs["hidden_states"].shape[0] == 2
    torch.testing.assert_close(neg_inputs["hidden_states"], inputs["hidden_states"][1:])  # shared image stream
    ref = copy.deepcopy(module).double()
    n = ref.heads

    def projections(x, c):
        q, k, v = (heads(f(x), n) for f in (ref.to_q, ref.to_k, ref.to_v))
        q, k = ref.norm_q(q), ref.norm_k(k)
        cq, ck, cv = (heads(f(c), n) for f in (ref.add_q_proj, ref.add_k_proj, ref.add_v_proj))
        return q, torch.cat([k, ref.norm_added_k(ck)], 2), torch.cat([v, cv], 2)

    x = inputs["hidden_states"].double()
    q, k, v = projections(x, inputs["encoder_hidden_states"].double())
    z_plus = merge(attention64(q, k, v))
    _, k_neg, v_neg = projections(x[1:], neg_inputs["encoder_hidden_states"].double())
    z_minus = merge(attention64(q[1:], k_neg, v_neg))
    z = z_plus.clone()
    z[1:] = nag_reference(z_plus[1:], z_minus, 3.0, 1.05, 0.5, 1)
    torch.testing.assert_close(out[0].double(), ref.to_out[0](z), rtol=1e-4, atol=1e-5)
    assert (z[1:] - z_plus[1:]).abs().max() > 1e-3
    assert _capped_share(z_plus[1:], z_minus, 3.0, 1.05) > 0  # the cap is exercised on this call


def test_sd3_negative_stream_starts_from_the_negative_prompt():
    pipe = tiny_pipeline("sd3")
    block = pipe.transformer.transformer_blocks[0]
    calls, handle = _record(block.attn)
    try:
        _run(pipe, "sd3", [Nag(negative_prompt=NEGATIVE)])
    finally:
        handle.remove()
    text_len = calls[1][0]["encoder_hidden_states"].shape[1]
    embeds = pipe.encode_prompt(NEGATIVE, None, None, device="cpu", do_classifier_free_guidance=False,
                                max_sequence_length=text_len - 77)[0]
    stream = pipe.transformer.context_embedder(embeds)
    temb = None  # the block's norm1_context on the stream, with the call's own temb, gives the attention input

    def capture(mod, args, kwargs):
        nonlocal temb
        temb = kwargs["temb"]

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        _run(pipe, "sd3", [])
    finally:
        handle.remove()
    normed = block.norm1_context(stream, emb=temb[1:])[0]
    torch.testing.assert_close(calls[0][0]["encoder_hidden_states"], normed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_scale_zero_equals_no_control_and_hooks_are_removed(family):
    pipe = tiny_pipeline(family)
    base, _ = _run(pipe, family, [], steps=2)
    zero, _ = _run(pipe, family, [Nag(negative_prompt=NEGATIVE, scale=0.0)], steps=2)
    assert torch.equal(base, zero)
    on, session = _run(pipe, family, [Nag(negative_prompt=NEGATIVE)], steps=2)
    assert (on - base).abs().max() > 1e-4
    assert session.last_run()["controls"]["nag"]["layer_calls"] > 0
    denoiser = session.denoiser
    assert all(not m._forward_pre_hooks for m in denoiser.modules())  # the negative-stream hooks are gone
    again, _ = _run(pipe, family, [], steps=2)
    assert torch.equal(base, again)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_without_cfg(family):
    """guidance 1 (SD1.5: no CFG batch) and FLUX (guidance-distilled): the negative prompt still acts."""
    pipe = tiny_pipeline(family)
    extra = {"guidance_scale": 1.0} if family == "sd15" else {}
    base, _ = _run(pipe, family, [], steps=2, **extra)
    on, session = _run(pipe, family, [Nag(negative_prompt=NEGATIVE)], steps=2, **extra)
    assert (on - base).abs().max() > 1e-4


def test_window_outside_equals_no_control():
    pipe = tiny_pipeline("sd3")
    base, _ = _run(pipe, "sd3", [], steps=2)
    late, _ = _run(pipe, "sd3", [Nag(negative_prompt=NEGATIVE, window={"start": 0.0, "stop": 0.5})], steps=2)
    full, _ = _run(pipe, "sd3", [Nag(negative_prompt=NEGATIVE)], steps=2)
    assert not torch.equal(late, base) and not torch.equal(late, full)


@pytest.mark.parametrize("options,words", [
    (dict(negative_prompt="  "), ["negative_prompt", "empty"]),
    (dict(negative_prompt=[]), ["negative_prompt"]),
    (dict(negative_prompt="blue", tau=1.0), ["tau", "1.0", "greater than 1"]),
    (dict(negative_prompt="blue", alpha=1.5), ["alpha", "1.5", "less than or equal to 1"]),
    (dict(negative_prompt="blue", alpha=-0.1), ["alpha", "-0.1"]),
    (dict(negative_prompt="blue", scale=-1), ["scale", "-1"]),
])
def test_bad_options_are_clear_errors(options, words):
    with pytest.raises(ControlError) as info:
        Nag(**options)
    for word in words:
        assert word in str(info.value)


def test_selector_without_text_reading_site_is_an_error():
    pipe = tiny_pipeline("sd15")
    with pytest.raises(SelectorError, match="among cross/joint/single layers"):
        with attnctl.apply(pipe, [Nag(negative_prompt="blue", layers=["kind=self"])]):
            pass
    with pytest.raises(SelectorError, match="attn1"):
        with attnctl.apply(pipe, [Nag(negative_prompt="blue",
                                      layers=["down_blocks.0.attentions.0.transformer_blocks.0.attn1"])]):
            pass


def test_negative_prompt_list_length_must_match_prompts():
    pipe = tiny_pipeline("sd15")
    with attnctl.apply(pipe, [Nag(negative_prompt=["blue", "green", "star"])]):
        with pytest.raises(ControlError, match="3 entries for 2 prompts"):
            pipe(["a red circle", "a star"], **tiny_call_kwargs("sd15", steps=1))


def test_per_prompt_negatives_guide_each_prompt_with_its_own():
    pipe = tiny_pipeline("sd15")
    prompts = ["a red circle", "a green star"]

    def run(negative):
        with attnctl.apply(pipe, [Nag(negative_prompt=negative)]):
            return pipe(prompts, **tiny_call_kwargs("sd15", steps=2)).images

    both = run(["blue", "square"])
    first = run("blue")
    second = run("square")
    torch.testing.assert_close(both[0], first[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(both[1], second[1], rtol=0, atol=1e-6)


def test_flux_double_and_single_stream_calls_match_explicit_float64():
    """FLUX (no CFG): block 0's double-stream attention over [text; image] and the first single-stream block's
    attention over the joined sequence, with RoPE; text first, only the image queries guided."""
    from diffusers.models.embeddings import apply_rotary_emb

    pipe = tiny_pipeline("flux")
    double = pipe.transformer.transformer_blocks[0].attn
    single = pipe.transformer.single_transformer_blocks[0].attn
    double_calls, h1 = _record(double)
    single_calls, h2 = _record(single)
    try:
        _run(pipe, "flux", [Nag(negative_prompt=NEGATIVE, scale=3.0, tau=1.05, alpha=0.5)])
    finally:
        h1.remove()
        h2.remove()

    def project(ref, x, c, rope):
        """q, k, v (B, H, S, D) of the sequence [c; x] (c None: x is the joined sequence already)."""
        q, k, v = (f(x).unflatten(-1, (-1, ref.head_dim)) for f in (ref.to_q, ref.to_k, ref.to_v))
        q, k = ref.norm_q(q), ref.norm_k(k)
        if c is not None:
            cq, ck, cv = (f(c).unflatten(-1, (-1, ref.head_dim)) for f in (ref.add_q_proj, ref.add_k_proj,
                                                                           ref.add_v_proj))
            q, k, v = (torch.cat(pair, 1) for pair in ((ref.norm_added_q(cq), q), (ref.norm_added_k(ck), k),
                                                       (cv, v)))
        rope = tuple(r.double() for r in rope)
        q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
        return (t.transpose(1, 2) for t in (q, k, v))

    # double-stream: positive call, then the negative one (its pre-hook ran first)
    (neg_in, _), (pos_in, out) = double_calls[0], double_calls[1]
    ref = copy.deepcopy(double).double()
    n_text = pos_in["encoder_hidden_states"].shape[1]
    x = pos_in["hidden_states"].double()
    rope = pos_in["image_rotary_emb"]
    z_plus = merge(attention64(*project(ref, x, pos_in["encoder_hidden_states"].double(), rope)))[:, n_text:]
    q_neg, k_neg, v_neg = project(ref, x, neg_in["encoder_hidden_states"].double(), rope)
    z_minus = merge(attention64(q_neg, k_neg, v_neg))[:, n_text:]
    z = nag_reference(z_plus, z_minus, 3.0, 1.05, 0.5, 1)
    torch.testing.assert_close(out[0].double(), ref.to_out[0](z), rtol=1e-4, atol=1e-5)
    assert (z - z_plus).abs().max() > 1e-3

    # single-stream: the joined sequences [text; image] of the negative pass and of the call itself
    (neg_in, _), (pos_in, out) = single_calls[0], single_calls[1]
    ref = copy.deepcopy(single).double()
    joined, joined_neg = pos_in["hidden_states"].double(), neg_in["hidden_states"].double()
    torch.testing.assert_close(joined_neg[:, n_text:].float(), joined[:, n_text:].float())  # shared image stream
    z_plus = merge(attention64(*project(ref, joined, None, pos_in["image_rotary_emb"])))
    z_minus = merge(attention64(*project(ref, joined_neg, None, pos_in["image_rotary_emb"])))
    want = z_plus.clone()
    want[:, n_text:] = nag_reference(z_plus[:, n_text:], z_minus[:, n_text:], 3.0, 1.05, 0.5, 1)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    assert (want - z_plus).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_combines_with_pag(family):
    """PAG's perturbed rows join the batch; NAG guides the cond rows only and leaves those rows alone."""
    from attnctl.controls.perturb import Perturb

    pipe = tiny_pipeline(family)
    pag, _ = _run(pipe, family, [Perturb(scale=2.0)], steps=2)
    both, session = _run(pipe, family, [Nag(negative_prompt=NEGATIVE), Perturb(scale=2.0)], steps=2)
    assert torch.isfinite(both).all() and (both - pag).abs().max() > 1e-4
    assert session.last_run()["controls"]["nag"]["layer_calls"] > 0


@pytest.mark.parametrize("family", ["flux2", "chroma", "qwenimage"])
def test_a_family_without_a_second_text_stream_is_refused_with_the_reason(family):
    pipe = tiny_pipeline(family)
    with pytest.raises(ControlError, match=f"does not support the {family} family.*negative"):
        with attnctl.apply(pipe, [Nag(negative_prompt="blue")]):
            pass
    denoiser = getattr(pipe, "transformer", None)
    assert all(getattr(m, "_attnctl_session", None) is None for m in denoiser.modules())  # nothing left behind
