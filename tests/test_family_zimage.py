"""Z-Image (``tiny:zimage``): the adapter, stock equality, the [cond; uncond] CFG batch, every control, bad input.

Real components only: diffusers' ``ZImagePipeline`` with tiny random weights (its ``ZSingleStreamAttnProcessor``,
its list-taking transformer, its CFG in one batch with the cond rows first, its caption padding and key masks).
"""

import functools

import pytest
import torch

import attnctl
from attnctl.controls.base import Control
from attnctl.controls.excite import Excite
from attnctl.controls.maps import Maps
from attnctl.controls.perturb import Perturb
from attnctl.controls.regions import Regions
from attnctl.engine import apply
from attnctl.errors import AttnctlError, ControlError, LayoutError, SelectorError
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

PROMPT = "a red circle and a blue square"
# Captions of different padded lengths (32 and 64 tokens with the chat turn): the main layers' rows are padded to
# the longest and the processor passes a boolean key mask.
# ZImagePipeline renders the chat template into the prompt list it is given (in place): pass a fresh list per call.
PROMPTS = (PROMPT, "a blue square and a red circle" + " and a small tree in the middle" * 4)


def prompts():
    return list(PROMPTS)
MAIN = "layers.1.attention"
REFINER = "noise_refiner.0.attention"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("zimage")


def kwargs(**overrides):
    return tiny_call_kwargs("zimage", **overrides)


class Probe(Control):
    """Records each call at the named sites (default: all): q, k, v, bias, spans, layout and the output."""

    name = "probe"

    def __init__(self, sites=None):
        super().__init__()
        self.sites, self.calls = sites, []

    def bind(self, session):
        return {s.name: None for s in session.sites if self.sites is None or s.name in self.sites}

    def on_attention(self, call):
        record = {"site": call.site.name, "q": call.q, "k": call.k, "v": call.v, "bias": call.bias,
                  "text": call.text, "image": call.image, "layout": call.layout, "grid": call.grid}
        self.calls.append(record)

        def keep(out):
            record["out"] = out
            return out

        call.then(keep)


def probabilities(record, rows):
    """float64 softmax(q k^T / sqrt(d) + bias) of ``rows`` of a recorded call, (R, H, S, S)."""
    q, k = record["q"][rows].double(), record["k"][rows].double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    bias = record["bias"]
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=torch.float64).masked_fill(~bias, float("-inf"))
        bias = bias.double()
        scores = scores + (bias[rows] if bias.shape[0] > 1 else bias)
    return torch.softmax(scores, dim=-1)


# -- the adapter ---------------------------------------------------------------------------------------------
def test_sites_kinds_and_token_spans(pipe):
    """The image refiner is self-attention, the main layers single-stream over [image; text]; the caption
    refiner (text only) is no site. Image first: its 8x8 tokens, padded to 64 (a multiple of 32), then the text;
    at 32x40 px the 8x10 image tokens are padded to 96 and the text starts there."""
    session = attnctl.engine.Session(pipe)
    assert session.family == "zimage"
    assert [(s.name, s.kind, s.heads, s.head_dim) for s in session.sites] == [
        ("noise_refiner.0.attention", "self", 4, 8), ("layers.0.attention", "single", 4, 8),
        ("layers.1.attention", "single", 4, 8)]
    for width, grid, start in ((32, (8, 8), 64), (40, (8, 10), 96)):
        probe = Probe([REFINER, MAIN])
        with apply(pipe, probe) as session:
            pipe(prompts(), **kwargs(steps=1, width=width))
            at = session.text_positions(0, "circle")
        refiner, main = probe.calls
        assert refiner["text"] is None and refiner["image"] == slice(0, grid[0] * grid[1])
        assert refiner["q"].shape[2] == start and tuple(refiner["grid"]) == grid
        assert main["image"] == slice(0, grid[0] * grid[1]) and main["text"] == slice(start, main["q"].shape[2])
        assert tuple(main["grid"]) == grid
        # CFG in one batch, cond rows first: [cond x 2; uncond x 2]
        assert main["layout"].branches == ("cond", "cond", "uncond", "uncond")
        assert main["layout"].samples == (0, 1, 0, 1)
        # the captions differ in length: the shorter rows' padding is masked by the processor's key mask
        assert main["bias"].dtype == torch.bool
        # the prompt's tokens follow the chat turn's prefix "<|im_start|>user\n"
        rendered = pipe.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                      add_generation_prompt=True)
        tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(rendered).input_ids)
        assert at == [tokens.index("Ġcircle")]


def test_no_control_equals_stock_bit_for_bit_and_hooks_within_1e5(pipe):
    """Under apply with no control the latents equal stock diffusers bit for bit (torch.equal): CFG with two
    prompts of different lengths, Z-Image-Turbo's call without CFG (guidance_scale=0) and CFG truncated at late
    steps; with a control that sees every attention call and changes nothing they are within 1e-5."""
    for call in (dict(), dict(guidance_scale=0.0), dict(cfg_truncation=0.3, steps=3)):
        steps = call.pop("steps", 2)
        stock = pipe(prompts(), **kwargs(steps=steps, **call)).images
        with apply(pipe, []):
            assert torch.equal(pipe(prompts(), **kwargs(steps=steps, **call)).images, stock)
        probe = Probe()
        with apply(pipe, probe):
            seen = pipe(prompts(), **kwargs(steps=steps, **call)).images
        assert (seen - stock).abs().max() <= 1e-5
        assert len(probe.calls) == 3 * steps  # every site, every step: one batched call per step
        layouts = [r["layout"].branches for r in probe.calls]
        if call.get("guidance_scale") == 0.0:
            assert set(layouts) == {("cond", "cond")}
        elif "cfg_truncation" in call:  # the last step, (1000 - t) / 1000 = 0.4 > 0.3, has the cond rows only
            assert set(layouts) == {("cond", "cond", "uncond", "uncond"), ("cond", "cond")}
        else:
            assert set(layouts) == {("cond", "cond", "uncond", "uncond")}


# -- perturb -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("site, mode", [(MAIN, "full"), (MAIN, "image"), (REFINER, "full")])
def test_head_level_pag_changes_only_the_chosen_heads(pipe, site, mode):
    """Perturbing head 1: on the perturbed rows heads 0, 2, 3 give exactly the cond rows' outputs; head 1 gives the
    identity (full: V; image, main layers: image queries see only the text keys and themselves, float64 dense
    reference). The perturbed rows follow [cond; uncond] and copy the cond rows."""
    probe = Probe([site])
    control = Perturb(layers=[f"{site}:heads=1"], scale=3.0, mode=mode)
    with apply(pipe, [control, probe]) as session:
        pipe(prompts(), **kwargs(steps=2))
    assert session.last_run()["controls"]["perturb"]["steps"] == [0, 1]
    assert len(probe.calls) == 2
    for record in probe.calls:
        layout = record["layout"]
        assert layout.branches == ("cond", "cond", "uncond", "uncond", "perturb", "perturb")
        assert layout.samples == (0, 1, 0, 1, 0, 1)
        out, v = record["out"], record["v"]
        for cond, perturbed in zip(layout.rows("cond"), layout.rows("perturb")):
            assert torch.equal(out[perturbed, [0, 2, 3]], out[cond, [0, 2, 3]])
            assert (out[perturbed, 1] - out[cond, 1]).abs().max() > 1e-3
            if mode == "full":
                assert torch.equal(out[perturbed, 1], v[perturbed, 1])
                continue
            text, seq = record["text"], v.shape[2]
            keep = torch.zeros(seq, seq, dtype=torch.bool)
            keep[:, text] = True
            keep[text, :] = True
            keep |= torch.eye(seq, dtype=torch.bool)
            mask = record["bias"][perturbed, 0, 0] if record["bias"] is not None else torch.ones(seq, dtype=torch.bool)
            keep &= mask[None, :]  # the row's own key mask: its batch padding stays out
            q, k = record["q"][perturbed, 1].double(), record["k"][perturbed, 1].double()
            scores = (q @ k.T / q.shape[-1] ** 0.5).masked_fill(~keep, float("-inf"))
            expected = torch.softmax(scores, dim=-1) @ v[perturbed, 1].double()
            real = mask.nonzero().flatten()  # padded query rows attend to nothing real: compare the others
            torch.testing.assert_close(out[perturbed, 1][real].double(), expected[real], atol=1e-5, rtol=1e-5)


def test_pag_scale_zero_is_plain_and_pag_folds_into_both_cfg_rows(pipe):
    """Scale 0 adds no rows: the stock batch, bit for bit. With scale s the result is CFG's plus s (cond -
    perturbed) exactly once: Z-Image's cond + w (cond - uncond) has weights summing to one, so the delta folded into
    both rows passes through unchanged for any w (checked against the same PAG with w = 0, Turbo's no-CFG call)."""
    plain = pipe(prompts(), **kwargs(steps=2)).images
    with apply(pipe, Perturb(layers=[MAIN], scale=0.0)):
        # Bit for bit when run alone; 1e-5 because the controlled site's attention goes through attnctl's SDPA
        # call, and torch picks its CPU SDPA kernel path from process state that another pipeline run with
        # diffusers' `_native_math` backend earlier in the process changes (measured 2.6e-6 after
        # tests/test_engine_v2.py's backend test; nothing of attnctl's is left installed).
        torch.testing.assert_close(pipe(prompts(), **kwargs(steps=2)).images, plain, atol=1e-5, rtol=0)
    with apply(pipe, Perturb(layers=[MAIN], scale=3.0)):
        guided = pipe(prompts(), **kwargs(steps=2)).images
    assert (guided - plain).abs().max() > 1e-3
    # One step from the same latents: the PAG delta under CFG (w = 4) equals the one without CFG (w = 0).
    deltas = {}
    for w in (0.0, 4.0):
        one = kwargs(steps=1, guidance_scale=w)
        base = pipe(prompts(), **one).images
        with apply(pipe, Perturb(layers=[MAIN], scale=3.0)):
            deltas[w] = pipe(prompts(), **kwargs(steps=1, guidance_scale=w)).images - base
    assert deltas[0.0].abs().max() > 1e-3
    torch.testing.assert_close(deltas[4.0], deltas[0.0], atol=1e-5, rtol=0)


def test_a_call_with_prompt_embeds_only_starts_at_prepare_latents(pipe):
    """Given prompt_embeds and no prompt, ZImagePipeline never calls encode_prompt; the call starts at
    prepare_latents and its batch is read as [cond; uncond] from do_classifier_free_guidance: PAG gives what it
    gives with the prompt, and a word-level control says it needs the prompt text."""
    embeds, negative = pipe.encode_prompt([PROMPT], device="cpu")
    with apply(pipe, Perturb(layers=[MAIN], scale=3.0)) as session:
        by_text = pipe([PROMPT], **kwargs(steps=2)).images
        by_embeds = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **kwargs(steps=2)).images
        assert session.last_run()["controls"]["perturb"]["steps"] == [0, 1]
    torch.testing.assert_close(by_embeds, by_text, atol=1e-6, rtol=0)
    with apply(pipe, Maps(words=["circle"], layers=[MAIN])):
        with pytest.raises(ControlError, match="needs the prompt text"):
            pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **kwargs(steps=1))


# -- PAG parity with diffusers' modular guider ----------------------------------------------------------------
def _modular(pipe, guider):
    """diffusers' modular Z-Image pipeline (``ZImageAutoBlocks``) on the same components, with ``guider``."""
    from diffusers.modular_pipelines import ZImageAutoBlocks

    modular = ZImageAutoBlocks().init_pipeline()
    modular.update_components(**pipe.components, guider=guider)
    return modular


@pytest.mark.parametrize("index", [0, 1])
def test_layer_pag_matches_diffusers_modular_guider(pipe, index):
    """diffusers' ``PerturbedAttentionGuidance`` on main layer ``index`` makes its attention return V for every
    token (the joined [image; text] sequence of a single-stream layer: attnctl's mode='full'). Its window counts
    steps strictly after int(start * steps), so step 0 never has PAG: attnctl's window starts after step 0 too.
    Its CFG is uncond + g (cond - uncond), ZImagePipeline's cond + w (cond - uncond): g = w + 1.

    float32, 3 steps, w = 4, PAG scale 2. The modular pipeline runs cond and uncond as separate calls (no caption
    padding mask), which alone moves its latents by up to 3e-6 (scale 0, measured); the outputs agree to 1e-4 and
    the change PAG makes (about 0.8) to 1e-4."""
    from diffusers.guiders import PerturbedAttentionGuidance

    site = f"layers.{index}.attention"
    call = dict(prompt=PROMPT, num_inference_steps=3, height=32, width=32, max_sequence_length=64, output="latents")
    theirs = {}
    for scale in (0.0, 2.0):
        guider = PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=scale,
                                            perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
                                            perturbed_guidance_config={"indices": [index], "fqn": "layers"})
        theirs[scale] = _modular(pipe, guider)(**call, generator=torch.Generator().manual_seed(0))
    plain = pipe(PROMPT, **kwargs(steps=3)).images
    torch.testing.assert_close(theirs[0.0], plain, atol=1e-5, rtol=0)
    probe = Probe([site])
    control = Perturb(scale=2.0, layers=[site], mode="full", window={"start": 0.3, "stop": 1.0})
    with apply(pipe, [control, probe]) as session:
        ours = pipe(PROMPT, **kwargs(steps=3)).images
    assert session.last_run()["controls"]["perturb"]["steps"] == [1, 2]
    for record in probe.calls:  # the perturbed rows' attention output is V itself, every token
        rows = record["layout"].rows("perturb")
        torch.testing.assert_close(record["out"][rows], record["v"][rows], atol=0, rtol=0)
    assert (ours - plain).abs().max() > 1e-1
    assert ((ours - plain) - (theirs[2.0] - theirs[0.0])).abs().max() < 1e-4
    torch.testing.assert_close(ours, theirs[2.0], atol=1e-4, rtol=0)


def test_attnctl_pag_on_the_modular_pipeline_equals_the_standard_one(pipe):
    """Under diffusers' modular Z-Image pipeline with a ``ClassifierFreeGuidance`` guider (cond and uncond as
    separate calls, each a one-row list) attnctl's PAG joins the cond call and the uncond call takes the same delta:
    the result equals attnctl's PAG on ``ZImagePipeline`` ([cond; uncond] in one batch) within 1e-5, and no
    control leaves the modular pipeline's latents bit for bit unchanged."""
    from diffusers.guiders import ClassifierFreeGuidance

    modular = _modular(pipe, ClassifierFreeGuidance(guidance_scale=5.0))
    call = dict(prompt=PROMPT, num_inference_steps=2, height=32, width=32, max_sequence_length=64, output="latents")
    plain = modular(**call, generator=torch.Generator().manual_seed(0))
    with apply(modular, []):
        assert torch.equal(modular(**call, generator=torch.Generator().manual_seed(0)), plain)
    with apply(modular, Perturb(layers=[MAIN], scale=2.0)):
        theirs = modular(**call, generator=torch.Generator().manual_seed(0))
    with apply(pipe, Perturb(layers=[MAIN], scale=2.0)):
        ours = pipe(PROMPT, **kwargs(steps=2)).images
    assert (theirs - plain).abs().max() > 1e-1
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


# -- maps, regions, excite ---------------------------------------------------------------------------------------
def test_maps_are_the_image_queries_softmax_column_over_the_image_tokens(pipe):
    """A word's map is the head-mean softmax probability of each image query for the word's key, on the cond
    row: softmax over every key of the row (its batch padding masked), read at the 8x8 image tokens only (not
    the image padding, not the text queries)."""
    maps = Maps(words=["circle"], layers=[MAIN])
    probe = Probe([MAIN])
    with apply(pipe, [maps, probe]) as session:
        pipe(prompts(), **kwargs(steps=1))
        at = session.text_positions(0, "circle")
    assert len(at) == 1
    (record,) = probe.calls
    row = record["layout"].rows("cond")[0]
    probs = probabilities(record, [row])
    assert torch.allclose(probs.sum(-1), torch.ones((), dtype=torch.float64))
    key = record["text"].start + at[0]
    expected = probs[0, :, record["image"], key].mean(dim=0).reshape(8, 8)
    torch.testing.assert_close(maps.maps["circle"][0].double(), expected, atol=1e-5, rtol=1e-4)


RED, BLUE = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


def test_hard_regions_confine_each_phrase_to_its_box(pipe):
    """Image queries outside a phrase's box give its tokens zero weight and inside positive; the phrase's queries
    see no image key outside its box. On the cond rows of the main layers, at 32x40 px (8x10 tokens, image padded
    to 96 tokens) with captions of different lengths; the uncond rows keep the processor's mask only."""
    regions = Regions(regions=[{"phrase": "red circle", "box": list(RED)}, {"phrase": "blue square", "box": list(BLUE)}],
                      mode="hard", window={"start": 0, "stop": 1})
    probe = Probe(["layers.0.attention", MAIN])
    with apply(pipe, [regions, probe]) as session:
        pipe(prompts(), **kwargs(steps=1, width=40))
        positions = {p: [session.text_positions(0, p)] for p in ("red circle", "blue square")}
    assert len(probe.calls) == 2
    for record in probe.calls:
        row = record["layout"].rows("cond")[0]  # sample 0: the prompt with both phrases
        probs = probabilities(record, [row])[0]
        image = record["image"]
        h, w = record["grid"]
        assert (h, w) == (8, 10)
        columns = torch.arange(w).repeat(h)
        for phrase, left in (("red circle", True), ("blue square", False)):
            inside = (columns < w // 2) if left else (columns >= w // 2)
            cols = [record["text"].start + p for p in positions[phrase][0]]
            to_phrase = probs[:, image][..., cols]
            assert bool((to_phrase[:, ~inside] == 0).all()) and bool((to_phrase[:, inside] > 0).all())
            from_phrase = probs[:, cols][..., image]
            assert bool((from_phrase[..., ~inside] == 0).all())
        # the uncond rows carry no region bias: only the processor's key mask, the same for every query
        for row in record["layout"].rows("uncond"):
            bias = record["bias"][row]
            assert bool(((bias == 0) | (bias == float("-inf"))).all()) and bool((bias == bias[:, :1]).all())


def test_excite_raises_the_weakest_subjects_attention(pipe):
    """Attend-and-Excite at step 0 raises the smoothed max attention of the subject that had the least: read by
    the control before its update, and again by a run with a negligible step size from the latents the update
    produced (the pipeline's own latents, (B, C, H, W), the batch view of the transformer's per-row list)."""
    original, seen = pipe.transformer.forward, []

    @functools.wraps(original)  # the engine binds arguments by the signature of the forward it wraps
    def spy(*args, **kw):
        if not torch.is_grad_enabled():
            seen.append(torch.stack(kw["x"] if "x" in kw else args[0]).squeeze(2)[:1].detach().clone())
        return original(*args, **kw)

    def excite(scale_factor):
        return Excite(subjects=[["circle", "square"]], window={"start": 0.0, "stop": 0.5}, thresholds={},
                      scale_factor=scale_factor, layers=[MAIN])

    pipe.transformer.forward = spy
    try:
        control = excite(200.0)
        with apply(pipe, control):
            pipe([PROMPT], **kwargs(steps=2))
    finally:
        pipe.transformer.forward = original
    before = [float(x) for x in control.history[0]["max_attention"][0]]
    weakest = before.index(min(before))
    probe = excite(1e-9)
    with apply(pipe, probe):
        pipe([PROMPT], **kwargs(steps=2, latents=seen[0].float()))
    after = [float(x) for x in probe.history[0]["max_attention"][0]]
    assert after[weakest] > before[weakest] + 1e-4, (before, after)


def test_edit_word_swap_runs_on_the_main_layers(pipe):
    """Prompt-to-prompt word swap: the target follows the source's attention; the source is its plain generation
    (one batch [source, target] under [cond; uncond] CFG)."""
    from attnctl.controls.edit import Edit

    with apply(pipe, Edit()):
        out = pipe(["a red circle", "a blue circle"], **kwargs(steps=2)).images
    plain = pipe(["a red circle", "a blue circle"], **kwargs(steps=2)).images
    assert (out[1] - plain[1]).abs().max() > 1e-4
    torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=0)


# -- bad input -------------------------------------------------------------------------------------------------
def test_selectors_and_controls_this_family_lacks_are_clear_errors(pipe):
    with pytest.raises(SelectorError, match="'transformer_blocks.0'"):  # a FLUX/Qwen-Image block name
        with apply(pipe, Perturb(layers=["transformer_blocks.0"])):
            pass
    with pytest.raises(SelectorError, match="'context_refiner.0'.*Close matches"):  # text only: not a site
        with apply(pipe, Perturb(layers=["context_refiner.0"])):
            pass
    with pytest.raises(SelectorError, match="head 4 does not exist in layers.1.attention, which has 4 heads"):
        with apply(pipe, Perturb(layers=["layers.1:heads=4"])):
            pass
    with pytest.raises(SelectorError, match="'kind=joint'"):
        with apply(pipe, Maps(words=["cat"], layers=["kind=joint"])):
            pass


def test_inversion_is_refused_naming_the_family(pipe):
    from attnctl.inversion import invert

    with pytest.raises(ControlError, match="zimage family"):
        invert(pipe, torch.zeros(32, 32, 3), "a red circle", steps=2, height=32, width=32)


def test_omni_calls_are_a_layout_error(pipe):
    """Z-Image-Omni passes a list of images per row: attnctl says it does not support that call."""
    x = [[torch.zeros(4, 1, 16, 16)]]
    with apply(pipe, Perturb(layers=[MAIN], scale=3.0)):
        with pytest.raises(LayoutError, match="omni mode"):
            pipe.transformer(x, torch.zeros(1), [[torch.zeros(8, 16)]], return_dict=False)
