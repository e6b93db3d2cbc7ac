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

from nag_checks import attention64, capped_share as _capped_share, heads, merge, nag as _nag, nag_reference, \
    record as _record

NEGATIVE = "blue square"
PROMPT = "a red circle"


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


def _negative_inputs(pipe, family, module, options):
    """Inputs of ``module``'s negative-pass calls under the whole-block path (its calls alternate: the negative
    pass first, then the call itself)."""
    calls, handle = _record(module)
    try:
        _run(pipe, family, [_nag("block", **options)])
    finally:
        handle.remove()
    return calls


def _run(pipe, family, controls, steps=1, **overrides):
    with attnctl.apply(pipe, controls) as session:
        out = pipe(prompt=PROMPT, **tiny_call_kwargs(family, steps=steps, **overrides)).images
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


@pytest.mark.parametrize("path", ["text", "block"])
def test_sd3_joint_attention_call_matches_explicit_float64(path):
    """Block 0's joint attention: image queries over [image; prompt text] and over [image; negative text]
    (the negative stream at block 0 is the context embedder's output for the negative prompt's embeddings).
    The negative text's attention input is recorded from the whole-block path (the module's own call there);
    the text path never calls the module for it."""
    pipe = tiny_pipeline("sd3")
    module = pipe.transformer.transformer_blocks[0].attn
    options = dict(negative_prompt=NEGATIVE, scale=3.0, tau=1.05, alpha=0.5)
    calls = _negative_inputs(pipe, "sd3", module, options)
    (neg_inputs, _), (inputs, out) = calls[0], calls[1]  # the negative pass runs first, on the cond row only
    assert neg_inputs["hidden_states"].shape[0] == 1 and inputs["hidden_states"].shape[0] == 2
    torch.testing.assert_close(neg_inputs["hidden_states"], inputs["hidden_states"][1:])  # shared image stream
    if path == "text":
        calls, handle = _record(module)
        try:
            _run(pipe, "sd3", [_nag("text", **options)])
        finally:
            handle.remove()
        assert len(calls) == 1  # one step, one call: the negative text's attention ran inside it
        inputs, out = calls[0]
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


@pytest.mark.parametrize("path", ["text", "block"])
def test_sd3_negative_stream_starts_from_the_negative_prompt(path, monkeypatch):
    """The whole-block path: the negative pass's attention input is the block's norm1_context of the context
    embedder's output for the negative prompt; the text path: the stream handed to the adapter's split of
    block 0 is that output (identical tokens once), and the text keys it gives are the module's add_k_proj +
    norm_added_k of the same normed stream."""
    from attnctl.adapters.sd3 import SD3Adapter

    pipe = tiny_pipeline("sd3")
    block = pipe.transformer.transformer_blocks[0]
    splits = []
    original = SD3Adapter.text_pass

    def spy(self, module, text, inputs):
        split = original(self, module, text, inputs)
        splits.append((module, text.tokens, split))
        return split

    monkeypatch.setattr(SD3Adapter, "text_pass", spy)
    calls, handle = _record(block.attn)
    try:
        _run(pipe, "sd3", [_nag(path, negative_prompt=NEGATIVE)])
    finally:
        handle.remove()
    text_len = calls[-1][0]["encoder_hidden_states"].shape[1]
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
    if path == "block":
        assert not splits
        torch.testing.assert_close(calls[0][0]["encoder_hidden_states"], normed, rtol=1e-5, atol=1e-5)
        return
    assert len(calls) == 1 and splits[0][0] is block
    # tiny:sd3 has no T5: its 256 T5 tokens are zeros, identical all through, carried as one (the 78th)
    assert pipe.text_encoder_3 is None and torch.equal(stream[:, 77:], stream[:, 77:78].expand_as(stream[:, 77:]))
    torch.testing.assert_close(splits[0][1], stream[:, :78], rtol=1e-5, atol=1e-5)
    attn = block.attn
    key = attn.norm_added_k(heads(attn.add_k_proj(normed[:, :78]), attn.heads))
    torch.testing.assert_close(splits[0][2].k, key, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "flux2", "chroma", "qwenimage", "zimage"])
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


@pytest.mark.parametrize("family", ["sd3", "flux2", "chroma", "qwenimage", "zimage"])
def test_window_outside_equals_no_control(family):
    """A window over the first of 2 steps: the first step guided as with the full window, the second plain (no
    negative pass at all: the same latents as no control after step 0 would give)."""
    pipe = tiny_pipeline(family)
    base, _ = _run(pipe, family, [], steps=2)
    late, session = _run(pipe, family, [Nag(negative_prompt=NEGATIVE, window={"start": 0.0, "stop": 0.5})], steps=2)
    full, full_session = _run(pipe, family, [Nag(negative_prompt=NEGATIVE)], steps=2)
    assert not torch.equal(late, base) and not torch.equal(late, full)
    calls = session.last_run()["controls"]["nag"]["layer_calls"]
    assert 2 * calls == full_session.last_run()["controls"]["nag"]["layer_calls"]


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


@pytest.mark.parametrize("path", ["text", "block"])
def test_flux_double_and_single_stream_calls_match_explicit_float64(path):
    """FLUX (no CFG): block 0's double-stream attention over [text; image] and the first single-stream block's
    attention over the joined sequence, with RoPE; text first, only the image queries guided."""
    from diffusers.models.embeddings import apply_rotary_emb

    pipe = tiny_pipeline("flux")
    double = pipe.transformer.transformer_blocks[0].attn
    single = pipe.transformer.single_transformer_blocks[0].attn
    options = dict(negative_prompt=NEGATIVE, scale=3.0, tau=1.05, alpha=0.5)

    def record(path):
        double_calls, h1 = _record(double)
        single_calls, h2 = _record(single)
        try:
            _run(pipe, "flux", [_nag(path, **options)])
        finally:
            h1.remove()
            h2.remove()
        return double_calls, single_calls

    double_calls, single_calls = record("block")  # the negative pass's inputs: the module's own call there
    if path == "text":
        double_text, single_text = record("text")
        assert len(double_text) == len(single_text) == 1  # no call of the module for the negative text
        double_calls = [double_calls[0], double_text[0]]
        single_calls = [single_calls[0], single_text[0]]

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


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2", "chroma", "qwenimage", "zimage"])
def test_combines_with_pag(family):
    """PAG's perturbed rows join the batch; NAG guides the cond rows only and leaves those rows alone."""
    from attnctl.controls.perturb import Perturb

    pipe = tiny_pipeline(family)
    pag, _ = _run(pipe, family, [Perturb(scale=2.0)], steps=2)
    both, session = _run(pipe, family, [Nag(negative_prompt=NEGATIVE), Perturb(scale=2.0)], steps=2)
    assert torch.isfinite(both).all() and (both - pag).abs().max() > 1e-4
    assert session.last_run()["controls"]["nag"]["layer_calls"] > 0


# -- the negative text stream's cost on MM-DiT: the blocks' text side only ------------------------------------------

def _latents(pipe, family, controls, steps=2, prompt=PROMPT):
    with attnctl.apply(pipe, controls) as session:
        out = pipe(prompt=prompt, **tiny_call_kwargs(family, steps=steps)).images
    return out, session.last_run()["controls"].get("nag", {})


@pytest.mark.parametrize("family,layers", [
    ("sd3", None),
    ("flux", None),
    ("sd3", ["transformer_blocks.1.attn"]),  # block 0 only advances the stream; block 1 is the last one run
    ("flux", ["single_transformer_blocks.0.attn"]),  # the double block only advances the stream
    ("flux2", None),
    ("flux2", ["single_transformer_blocks.0.attn"]),
    ("chroma", None),
    ("chroma", ["single_transformer_blocks.1.attn"]),
    ("qwenimage", None),
    ("qwenimage", ["transformer_blocks.1.attn"]),
    ("zimage", None),
    ("zimage", ["layers.1.attention"]),
])
def test_text_path_equals_whole_block_path(family, layers):
    """The text-only pass gives the whole-block pass's output within float32 noise (atol 1e-5 on the latents
    after 2 steps; measured 0 on FLUX and Chroma, 2.4e-6 on SD3, about 1e-6 on FLUX.2, Qwen-Image and Z-Image),
    and the guidance does act (> 1e-4 from no control)."""
    pipe = tiny_pipeline(family)
    options = dict(negative_prompt=NEGATIVE, layers=layers)
    block, block_stats = _latents(pipe, family, [_nag("block", **options)])
    text, text_stats = _latents(pipe, family, [_nag("text", **options)])
    base, _ = _latents(pipe, family, [])
    torch.testing.assert_close(text, block, rtol=0, atol=1e-5)
    assert (text - base).abs().max() > 1e-4
    assert block_stats["negative_stream"]["text"] == 0 and block_stats["negative_stream"]["block"] > 0
    assert text_stats["negative_stream"]["block"] == 0
    assert text_stats["negative_stream"]["text"] == block_stats["negative_stream"]["block"]
    assert text_stats["layer_calls"] == block_stats["layer_calls"]


def test_text_path_equals_whole_block_path_on_shapes_dit():
    """The embedded SD3-format model (trained weights, 4 blocks), 2 steps at 64 px, CFG on, in float64: the two
    paths agree to 1e-9 on latents of size ~10 (measured 1.8e-15; in float32 they differ by up to 4e-5, the
    trained weights amplifying rounding, which is why this one runs in float64)."""
    from attnctl.models import load

    pipe = load("shapes-dit", device="cpu", dtype=torch.float64)
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="latent", guidance_scale=5.0)

    def run(controls):
        with attnctl.apply(pipe, controls):
            return pipe("a red circle", generator=torch.Generator("cpu").manual_seed(0), **kwargs).images

    block = run([_nag("block", negative_prompt="a blue square")])
    text = run([_nag("text", negative_prompt="a blue square")])
    torch.testing.assert_close(text, block, rtol=0, atol=1e-9)
    assert (text - run([])).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2", "chroma", "qwenimage", "zimage"])
def test_text_path_combines_with_pag_like_the_whole_block_path(family):
    """PAG's perturbed rows (joined late, at the first hooked block) are left alone by both paths alike."""
    from attnctl.controls.perturb import Perturb

    pipe = tiny_pipeline(family)
    block, _ = _latents(pipe, family, [_nag("block", negative_prompt=NEGATIVE), Perturb(scale=2.0)])
    text, _ = _latents(pipe, family, [_nag("text", negative_prompt=NEGATIVE), Perturb(scale=2.0)])
    torch.testing.assert_close(text, block, rtol=0, atol=1e-5)


def test_a_block_the_adapter_cannot_split_runs_whole():
    """A processor the SD3 adapter does not know (a subclass of the stock one) on block 1: that block's negative
    pass runs the whole block, the others only their text side; the output still equals the reference."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class OwnProcessor(JointAttnProcessor2_0):
        pass

    pipe = tiny_pipeline("sd3")
    pipe.transformer.transformer_blocks[1].attn.set_processor(OwnProcessor())
    block, _ = _latents(pipe, "sd3", [_nag("block", negative_prompt=NEGATIVE)])
    text, stats = _latents(pipe, "sd3", [_nag("text", negative_prompt=NEGATIVE)])
    torch.testing.assert_close(text, block, rtol=0, atol=1e-5)
    steps, blocks = 2, len(pipe.transformer.transformer_blocks)
    assert stats["negative_stream"]["block"] == steps
    assert stats["negative_stream"]["text"] == steps * (blocks - 1)


def _count_calls(modules):
    """Forward hooks counting calls and input tokens (rows x sequence) of each named module."""
    counts, handles = {}, []
    for name, module in modules:
        counts[name] = [0, 0]

        def hook(mod, args, kwargs, name=name):
            x = args[0] if args else next(iter(kwargs.values()))
            counts[name][0] += 1
            counts[name][1] += x.shape[0] * x.shape[1]

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return counts, handles


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_text_path_runs_no_image_side_work_for_the_negative_stream(family):
    """Counted per module over a 2-step call without CFG: under the text path no block's image-stream work (the
    joint blocks' norm1 and image MLP ``ff``, the attention modules) runs more often than without the control,
    and a single-stream block's shared MLP sees the image tokens once; the text stream's MLP (``ff_context``,
    or a single block's ``proj_mlp`` on the text tokens) runs once more per block before the last one. The
    whole-block path runs all of it twice."""
    pipe = tiny_pipeline(family)
    transformer = pipe.transformer
    blocks = [(f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]
    blocks += [(f"single_transformer_blocks.{i}", b)
               for i, b in enumerate(getattr(transformer, "single_transformer_blocks", []))]
    watched = [(f"{name}.{part}", getattr(block, part)) for name, block in blocks
               for part in ("norm1", "ff", "ff_context", "attn", "proj_mlp", "norm")
               if getattr(block, part, None) is not None]
    extra = {} if family == "flux" else {"guidance_scale": 1.0}  # no CFG: one row, the guided one

    def counted(controls):
        counts, handles = _count_calls(watched)
        try:
            with attnctl.apply(pipe, controls) as session:
                pipe(PROMPT, **tiny_call_kwargs(family, steps=2, **extra))
        finally:
            for handle in handles:
                handle.remove()
        return counts, session.attention_calls

    base, base_attention = counted([])
    text, text_attention = counted([_nag("text", negative_prompt=NEGATIVE)])
    block, block_attention = counted([_nag("block", negative_prompt=NEGATIVE)])
    assert text_attention == base_attention and block_attention > base_attention
    n_text = 32 if family == "flux" else None
    last = blocks[-1][0]
    for name, (calls, tokens) in base.items():
        part = name.rsplit(".", 1)[1]
        if part in ("norm1", "ff", "attn"):  # image side (the attention module: one call, its own)
            assert text[name] == [calls, tokens], name
            assert block[name][0] == calls * 2 or name.startswith(last), name
        elif part == "ff_context":  # the text stream's MLP: once more, on the negative text
            assert text[name][0] == calls * 2 or name.startswith(last), name
        elif part == "proj_mlp":  # a single-stream block's MLP: the negative text tokens only
            if not name.startswith(last):
                assert text[name][0] == calls * 2
                assert text[name][1] == tokens + calls * n_text
                assert block[name][1] == tokens * 2


@pytest.mark.parametrize("family,size,at_most", [("sd3", None, 1.2), ("flux", None, 1.6), ("flux", 96, 1.3)])
def test_flops_of_the_text_path(family, size, at_most):
    """Floating-point operations of a 1-step call without CFG (``attnctl.bench.nag.count_flops``), against the
    plain call: the whole-block path doubles the work (1.99x), CFG doubles it (2.0x), the text path adds only the
    negative text stream and its attention to the image keys (measured: SD3 at its tiny size, 256 image and 333
    text tokens of which 256 identical, 1.14x; FLUX at its tiny size, 64 image and 32 text tokens, 1.52x; FLUX
    at 96 px, 576 image tokens, < 1.3x)."""
    from attnctl.bench.nag import count_flops

    pipe = tiny_pipeline(family)
    overrides = {"height": size, "width": size} if size else {}
    no_cfg = {} if family == "flux" else {"guidance_scale": 1.0}
    cfg = {"true_cfg_scale": 4.0, "negative_prompt": NEGATIVE} if family == "flux" else {"guidance_scale": 5.0}

    def flops(controls, **extra):
        def generate():
            with attnctl.apply(pipe, controls):
                pipe(PROMPT, **tiny_call_kwargs(family, steps=1, **overrides, **extra))
        return count_flops(generate)

    base = flops([], **no_cfg)
    text = flops([_nag("text", negative_prompt=NEGATIVE)], **no_cfg) / base
    block = flops([_nag("block", negative_prompt=NEGATIVE)], **no_cfg) / base
    assert flops([], **cfg) / base > 1.95 and block > 1.95
    assert 1.0 < text <= at_most


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_shared_attention_steps_aside_when_another_control_changes_the_rows(family):
    """A control adding a (zero) bias to every call keeps the guided rows on the backend (``take_rows`` is not
    honoured): NAG then computes Z- with its own attention (on SD3 with the identical tokens' key bias), and the
    output is the same within float32 noise."""
    from attnctl.controls.base import Control

    class ZeroBias(Control):
        name = "zero-bias-test"

        def bind(self, session):
            return {site.name: None for site in session.sites}

        def on_attention(self, call):
            call.add_bias(torch.zeros(call.k.shape[2]))

    pipe = tiny_pipeline(family)
    alone, stats = _latents(pipe, family, [_nag("text", negative_prompt=NEGATIVE)])
    biased, biased_stats = _latents(pipe, family, [_nag("text", negative_prompt=NEGATIVE), ZeroBias()])
    assert stats["negative_stream"]["shared_calls"] == stats["layer_calls"] > 0
    assert biased_stats["negative_stream"]["shared_calls"] == 0
    assert biased_stats["layer_calls"] == stats["layer_calls"]
    torch.testing.assert_close(biased, alone, rtol=0, atol=1e-5)


def test_identical_negative_tokens_are_carried_once():
    """SD3 without T5 (tiny:sd3, shapes-dit): the 256 T5 tokens are zeros and stay identical in every block, so
    the text path carries one of them (78 tokens, each key counted as often as it stands for); counted: the
    negative text's attentions add under a fifth of the query-key pairs of all 333 tokens, and the output still
    equals the whole-block path (test_text_path_equals_whole_block_path)."""
    from attnctl.controls.nag import _identical_tokens

    stream = torch.randn(2, 6, 4)
    stream[:, 3] = stream[:, 1]
    stream[:, 5] = stream[:, 1]
    first, group, log_counts = _identical_tokens(stream)
    assert first.tolist() == [0, 1, 2, 4] and group.tolist() == [0, 1, 2, 1, 3, 1]
    torch.testing.assert_close(log_counts.exp(), torch.tensor([1.0, 3.0, 1.0, 1.0]))
    assert torch.equal(stream[:, first][:, group], stream)
    stream[0, 3, 0] += 1  # identical in one row only: not shared
    assert _identical_tokens(stream)[0].tolist() == [0, 1, 2, 3, 4]
    assert _identical_tokens(torch.randn(1, 5, 3)) is None

    pipe = tiny_pipeline("sd3")
    shapes = []
    handle = pipe.transformer.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append((kwargs["hidden_states"].shape[1],
                                                 kwargs["encoder_hidden_states"].shape[1])), with_kwargs=True)
    try:
        _, stats = _latents(pipe, "sd3", [_nag("text", negative_prompt=NEGATIVE)], steps=1)
    finally:
        handle.remove()
    (n_image, n_text), = shapes
    blocks, shared = len(pipe.transformer.transformer_blocks), 78
    assert n_text == 333 and stats["negative_stream"]["shared_calls"] == blocks
    # per block: the image queries over the negative text keys; before the last block the negative text's queries
    # over [image; negative text] (one guided row: CFG's cond row)
    expected = blocks * n_image * shared + (blocks - 1) * shared * (n_image + shared)
    assert stats["negative_stream"]["attention_pairs"] == expected
    assert expected < 0.2 * (blocks * n_image * n_text + (blocks - 1) * n_text * (n_image + n_text))
