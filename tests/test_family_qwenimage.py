"""Qwen-Image on the tiny random pipeline: stock equality, the true-CFG layout, each control as defined, bad input.

The family-parametrised tests (test_engine*, test_maps, test_regions, test_perturb, test_excite, test_interpolate,
test_edit, test_select) also run on ``tiny:qwenimage``; this file covers what is particular to Qwen-Image: true
CFG as a second call per step, prompts of different lengths (a boolean key mask inside the joint attention), the
prompt template's dropped prefix, and errors naming this family.
"""

import functools

import pytest
import torch

from attnctl.controls.base import Control
from attnctl.controls.excite import Excite
from attnctl.controls.maps import Maps
from attnctl.controls.perturb import Perturb
from attnctl.controls.regions import Regions
from attnctl.engine import Session, apply
from attnctl.errors import AttnctlError, LayoutError
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

PROMPTS = ["a red circle and a blue square", "a cat"]  # different lengths: the processor masks the padding


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("qwenimage")


def kwargs(**overrides):
    """True CFG (negative prompt, scale 4): two transformer calls per step."""
    return tiny_call_kwargs("qwenimage", **{"negative_prompt": "a tree", "true_cfg_scale": 4.0, **overrides})


class Recorder(Control):
    """Hooks the given sites (default: all), changes nothing, records each call's q, k, v, output and layout."""

    name = "recorder"

    def __init__(self, sites=None):
        super().__init__()
        self.wanted, self.records = sites, []

    def bind(self, session):
        return {s.name: None for s in session.sites if self.wanted is None or s.name in self.wanted}

    def on_attention(self, call):
        record = {"site": call.site.name, "q": call.q, "k": call.k, "v": call.v, "bias": call.bias,
                  "branches": call.layout.branches, "text": call.text, "image": call.image, "grid": call.grid}
        call.then(lambda out: record.__setitem__("out", out) or out)
        self.records.append(record)


def test_no_control_equals_stock_with_true_cfg_and_masked_prompts(pipe):
    """Under apply with no control the latents equal stock diffusers bit for bit (torch.equal); with a control
    that sees every attention call (so every call goes through attnctl's attention) and changes nothing they are
    within 1e-5: two prompts of different lengths (a key mask in every call) and true CFG's second call."""
    stock = pipe(PROMPTS, **kwargs()).images
    with apply(pipe, []):
        assert torch.equal(pipe(PROMPTS, **kwargs()).images, stock)
    recorder = Recorder()
    with apply(pipe, recorder):
        seen = pipe(PROMPTS, **kwargs()).images
    assert (seen - stock).abs().max() <= 1e-5
    # Every call of every site went through the control: 2 sites x 3 steps x (cond call + uncond call).
    assert len(recorder.records) == 2 * 3 * 2
    assert {r["branches"] for r in recorder.records} == {("cond", "cond"), ("uncond", "uncond")}
    # The two prompts differ in length, so the cond calls carry the processor's boolean key mask to the control.
    assert all(r["bias"].dtype == torch.bool for r in recorder.records if r["branches"][0] == "cond")


def test_text_span_and_token_positions(pipe):
    """The text span is the template's encoding minus its 34-token system prefix: a word's position in it is its
    position in the prompt, and the keys there are the text encoder's features of that token."""
    recorder = Recorder(["transformer_blocks.0.attn"])
    maps = Maps(words=["square", "circle"], layers=["transformer_blocks.0.attn"])
    with apply(pipe, [maps, recorder]) as session:
        pipe(PROMPTS[0], **tiny_call_kwargs("qwenimage", steps=1))
        positions = {w: session.text_positions(0, w) for w in ("red circle", "square")}
    ids = pipe.tokenizer(PROMPTS[0]).input_ids
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)
    assert positions == {"red circle": [tokens.index("Ġred"), tokens.index("Ġcircle")],
                         "square": [tokens.index("Ġsquare")]}
    (record,) = recorder.records
    embeds, _ = pipe.encode_prompt(PROMPTS[0])
    assert record["text"] == slice(0, embeds.shape[1]) and record["image"].start == embeds.shape[1]
    assert tuple(record["grid"]) == (4, 4)  # 32 px: 8x8 latents packed 2x2


@pytest.mark.parametrize("mode", ["full", "image"])
def test_head_level_pag_changes_only_the_chosen_heads(pipe, mode):
    """Perturbing head 1 of block 1: on the perturbed rows, heads 0, 2, 3 give exactly the cond rows' outputs;
    head 1 gives the identity (mode full: v; mode image: image queries see only the text keys and themselves)."""
    recorder = Recorder(["transformer_blocks.1.attn"])
    control = Perturb(layers=["transformer_blocks.1.attn:heads=1"], scale=3.0, mode=mode)
    with apply(pipe, [control, recorder]) as session:
        pipe(PROMPTS[0], **kwargs(steps=2))
    assert session.last_run()["controls"]["perturb"]["steps"] == [0, 1]
    guided = [r for r in recorder.records if "perturb" in r["branches"]]
    assert len(guided) == 2 and all(r["branches"] == ("cond", "perturb") for r in guided)
    uncond = [r for r in recorder.records if "uncond" in r["branches"]]
    assert len(uncond) == 2 and all(r["branches"] == ("uncond",) for r in uncond)  # true CFG's call: no rows added
    for record in guided:
        out, q, k, v = (record[n].double() for n in ("out", "q", "k", "v"))
        others = [0, 2, 3]
        assert torch.equal(record["out"][1, others], record["out"][0, others])
        assert (out[1, 1] - out[0, 1]).abs().max() > 1e-3
        if mode == "full":
            expected = v[1, 1]
        else:  # float64 reference: a dense mask keeping text keys and each image query's own key
            text = record["text"]
            seq = q.shape[2]
            keep = torch.zeros(seq, seq, dtype=torch.bool)
            keep[:, text] = True
            keep[text, :] = True
            keep |= torch.eye(seq, dtype=torch.bool)
            scores = (q[1, 1] @ k[1, 1].T) / q.shape[-1] ** 0.5
            expected = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v[1, 1]
        torch.testing.assert_close(out[1, 1], expected, atol=1e-5, rtol=1e-5)


def test_pag_guides_with_true_cfg_and_scale_zero_is_plain(pipe):
    plain = pipe(PROMPTS[0], **kwargs()).images
    with apply(pipe, Perturb(layers=["transformer_blocks.1"], scale=0.0)):
        # The perturbed rows join the cond call's batch, so float32 sums may split differently: 1e-5, not bits.
        torch.testing.assert_close(pipe(PROMPTS[0], **kwargs()).images, plain, atol=1e-5, rtol=0)
    with apply(pipe, Perturb(layers=["transformer_blocks.1"], scale=3.0)):
        guided = pipe(PROMPTS[0], **kwargs()).images
    assert (guided - plain).abs().max() > 1e-3


def test_regions_confine_a_phrase_to_its_box_in_both_prompt_lengths(pipe):
    """Hard regions: image queries outside a phrase's box give that phrase's tokens zero weight, inside positive,
    in the cond call; true CFG's uncond call is untouched."""
    recorder = Recorder(["transformer_blocks.0.attn"])
    regions = Regions(regions=[{"phrase": "red circle", "box": [0.0, 0.0, 0.5, 1.0]}], mode="hard",
                      window={"start": 0.0, "stop": 1.0})
    with apply(pipe, [regions, recorder]) as session:
        pipe(PROMPTS[0], **kwargs(steps=1, height=32, width=64))
        columns = session.text_positions(0, "red circle")
    cond = [r for r in recorder.records if r["branches"] == ("cond",)]
    uncond = [r for r in recorder.records if r["branches"] == ("uncond",)]
    assert len(cond) == 1 and len(uncond) == 1
    (record,) = cond
    h, w = record["grid"]
    assert (h, w) == (4, 8)
    q, k = record["q"].double(), record["k"].double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    # The control's own bias is what the call computed with: rebuild the probabilities from it.
    bias = record["bias"]
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=torch.float64).masked_fill(~bias, float("-inf"))
    probs = torch.softmax(scores + bias.double(), dim=-1)
    image = record["image"]
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[:, : w // 2] = True
    to_phrase = probs[0, :, image][:, :, columns]  # (H, S_img, len(columns))
    assert bool((to_phrase[:, ~inside.flatten()] == 0).all()) and bool((to_phrase[:, inside.flatten()] > 0).all())
    assert uncond[0]["bias"] is None  # no region bias on the uncond call (one negative prompt: no key mask either)


def test_excite_raises_the_weakest_subjects_attention(pipe):
    """Attend-and-Excite at step 0 raises the smoothed max attention of the subject that had the least: read by
    the control before its update, and again by a second run that starts from the latents the update produced."""
    prompt = "a red circle and a blue square"

    def excite(scale_factor):
        return Excite(subjects=[["circle", "square"]], window={"start": 0.0, "stop": 0.5}, thresholds={},
                      scale_factor=scale_factor)

    original, seen = pipe.transformer.forward, []

    @functools.wraps(original)  # the engine binds arguments by the signature of the forward it wraps
    def spy(*args, **kw):  # the engine calls the forward it found on entry: record the step-0 main call's input
        if not torch.is_grad_enabled():
            seen.append(kw["hidden_states"].detach().clone())
        return original(*args, **kw)

    pipe.transformer.forward = spy
    try:
        control = excite(200.0)
        with apply(pipe, control):
            pipe(prompt, **tiny_call_kwargs("qwenimage", steps=2))
    finally:
        pipe.transformer.forward = original
    before = [float(x) for x in control.history[0]["max_attention"][0]]
    weakest = before.index(min(before))
    probe = excite(1e-9)  # reads the same loss on the updated latents (its own update is negligible)
    with apply(pipe, probe):
        pipe(prompt, **tiny_call_kwargs("qwenimage", steps=2, latents=seen[0]))
    after = [float(x) for x in probe.history[0]["max_attention"][0]]
    assert after[weakest] > before[weakest] + 1e-4, (before, after)


def test_selectors_and_controls_this_family_lacks_are_errors(pipe):
    with pytest.raises(AttnctlError, match="single_transformer_blocks"):
        with apply(pipe, Perturb(layers=["single_transformer_blocks.0"])):
            pass
    with pytest.raises(AttnctlError, match="transformer_blocks.7"):
        with apply(pipe, Maps(words=["cat"], layers=["transformer_blocks.7"])):
            pass
    with pytest.raises(AttnctlError, match="cross"):
        with apply(pipe, Maps(words=["cat"], layers=["kind=cross"])):
            pass


def test_a_call_of_unknown_kind_is_a_layout_error(pipe):
    with apply(pipe, Perturb(layers=["transformer_blocks.1"], scale=3.0)):
        with pytest.raises(LayoutError, match="cache_context 'other'"):
            def named_other(*args, **kw):
                with pipe.transformer.cache_context("other"):
                    return original(*args, **kw)

            original = pipe.transformer.forward
            pipe.transformer.forward = named_other
            try:
                pipe("a cat", **tiny_call_kwargs("qwenimage", steps=1))
            finally:
                pipe.transformer.forward = original


def test_editing_a_real_image_runs_end_to_end(pipe):
    """``edit`` of a real image: inverted through the adapter's encoding (one frame of the video VAE, per-channel
    latents_mean/std, packed 2x2), then source and target generated from it under the edit control; the
    negative-prompt fix switches true CFG on (the pipeline's true_cfg_scale). The source row is the plain
    regeneration of the inverted image."""
    import numpy as np

    from attnctl.editing import edit
    from attnctl.inversion import regenerate

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    result = edit(pipe, "a red circle", "a blue circle", image=image, steps=3, guidance_scale=4.0, height=32,
                  width=32)
    assert result.inversion.latents.shape == (1, 16, 16)
    source, target = np.asarray(result.source, dtype=int), np.asarray(result.target, dtype=int)
    assert source.shape == target.shape == (32, 32, 3) and np.abs(target - source).max() > 0
    plain = regenerate(pipe, result.inversion, ["a red circle", "a blue circle"], output_type="pil").images
    assert np.abs(source - np.asarray(plain[0], dtype=int)).max() <= 1


def test_edit_reference_grids_and_a_mask_covering_them_is_refused(tmp_path):
    """Qwen-Image-Edit's ``img_shapes`` holds [generated grid, reference grid] per sample (its pipeline is not
    built tiny here: the Qwen2.5-VL processor's vision side): the adapter reads the reference grid, and a regions
    mask drawn on the generated image and its reference side by side is refused by name."""
    from PIL import Image

    from attnctl.adapters.qwenimage import QwenImageAdapter
    from attnctl.errors import ControlError

    params = {"img_shapes": [[(1, 8, 8), (1, 8, 12)]]}
    adapter = QwenImageAdapter()
    assert adapter.latent_hw(params) == (8, 8) and adapter.reference_grids(params) == [(8, 12)]
    assert adapter.reference_grids({"img_shapes": [[(1, 8, 8)]]}) == []
    path = tmp_path / "joined.png"
    Image.new("L", (100, 40), 255).save(path)  # (8 + 12) x 8 tokens: 2.5 wide
    regions = Regions(regions=[{"phrase": "circle", "box": [0, 0, 1, 1]}, {"phrase": "square", "mask": str(path)}])
    with pytest.raises(ControlError, match=r"regions\.1\.mask = .*joined\.png.*side by side.*generated image only"):
        regions._check_references(adapter.latent_hw(params), adapter.reference_grids(params))
    regions._check_references((8, 20), [])  # no references: the usual aspect check applies, not this one


def test_interpolate_anchors_are_plain_and_frames_move_between_them(pipe):
    from interpolation_checks import check_interpolation

    check_interpolation(pipe, "qwenimage")


# -- PAG parity with diffusers' modular pipeline and its PerturbedAttentionGuidance guider ----------------------
def _recording(pipe, monkeypatch):
    """Record every transformer output (the calls the pipeline makes, before attnctl folds any rows) and the
    noise prediction each scheduler step takes."""
    import functools

    outputs, steps = [], []
    forward, step = pipe.transformer.forward, pipe.scheduler.step

    @functools.wraps(forward)  # the modular pipeline reads the forward's signature
    def record_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out.sample).detach().clone())
        return out

    def record_step(model_output, *args, **kwargs):
        steps.append(model_output.detach().clone())
        return step(model_output, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", record_forward)
    monkeypatch.setattr(pipe.scheduler, "step", record_step)
    return outputs, steps


def _rescaled(pred, like):
    """Qwen-Image's true-CFG rescale: ``pred`` scaled per token to the norm of ``like`` (over channels)."""
    return pred * (like.norm(dim=-1, keepdim=True) / pred.norm(dim=-1, keepdim=True))


SITE, SCALE, CFG = "transformer_blocks.1.attn", 2.0, 4.0


def test_pag_against_diffusers_modular_guider_each_with_its_float64_reference(pipe, monkeypatch):
    """Layer PAG at ``transformer_blocks.1`` (scale 2, true CFG 4, 3 steps, float32) two ways.

    diffusers' modular Qwen-Image pipeline with ``PerturbedAttentionGuidance`` runs three calls per PAG step (cond,
    uncond, cond with the block's attention scores skipped: the joint [text; image] attention returns V, attnctl's
    ``mode='full'``) and combines ``pred = uncond + 4 (cond - uncond) + 2 (cond - skip)``, then rescales it to the
    norm of the *unmodified* cond prediction: ``pred * |cond| / |pred|``.

    attnctl on ``QwenImagePipeline`` runs the perturbed rows in the cond call and folds ``d = 2 (cond - pert)``
    into both calls' outputs; the pipeline combines ``(uncond + d) + 4 ((cond + d) - (uncond + d))``, the same
    ``pred``, and rescales it to the norm of what it got as the cond prediction, ``cond + d``:
    ``pred * |cond + d| / |pred|``. The perturbed predictions agree (the same layer, the same identity map); the
    rescale differs, so each is checked against its own float64 formula, and the difference is shown to matter.
    The guider's window counts steps strictly after ``int(start * steps)``: PAG on steps 1 and 2 in both.
    """
    from diffusers.guiders import PerturbedAttentionGuidance
    from diffusers.modular_pipelines import QwenImageAutoBlocks

    call = dict(prompt=PROMPTS[0], negative_prompt="a tree", num_inference_steps=3, height=32, width=32)
    outputs, steps = _recording(pipe, monkeypatch)

    modular = QwenImageAutoBlocks().init_pipeline()
    guider = PerturbedAttentionGuidance(guidance_scale=CFG, perturbed_guidance_scale=SCALE,
                                        perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
                                        perturbed_guidance_config={"indices": [1], "fqn": "transformer_blocks"})
    modular.update_components(**pipe.components, guider=guider)
    modular(**call, generator=torch.Generator().manual_seed(0), output="latents")
    theirs = {"outputs": [o.double() for o in outputs], "steps": [s.double() for s in steps]}
    assert len(theirs["outputs"]) == 2 + 3 + 3 and len(theirs["steps"]) == 3  # step 0: no PAG (the window)

    outputs.clear(), steps.clear()
    probe = Recorder([SITE])
    control = Perturb(scale=SCALE, layers=[SITE], mode="full", window={"start": 0.3, "stop": 1.0})
    with apply(pipe, [control, probe]) as session:
        pipe(**call, true_cfg_scale=CFG, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert session.last_run()["controls"]["perturb"]["steps"] == [1, 2]
    for record in (r for r in probe.records if "perturb" in r["branches"]):  # the perturbed rows' output is V
        torch.testing.assert_close(record["out"][1], record["v"][1], atol=0, rtol=0)
    ours = {"outputs": [o.double() for o in outputs], "steps": [s.double() for s in steps]}
    # the cond call carries [cond; perturbed] rows (joined at block 1), the uncond call one row
    assert [o.shape[0] for o in ours["outputs"]] == [1, 1, 2, 1, 2, 1]

    differences = []
    for i in (1, 2):
        cond, uncond, skip = theirs["outputs"][2 + 3 * (i - 1): 5 + 3 * (i - 1)]
        pred = uncond + CFG * (cond - uncond) + SCALE * (cond - skip)
        torch.testing.assert_close(theirs["steps"][i], _rescaled(pred, cond), atol=1e-5, rtol=1e-5)

        both, uncond = ours["outputs"][2 * i], ours["outputs"][2 * i + 1]
        cond, pert = both[:1], both[1:]
        d = SCALE * (cond - pert)
        pred = (uncond + d) + CFG * ((cond + d) - (uncond + d))
        torch.testing.assert_close(ours["steps"][i], _rescaled(pred, cond + d), atol=1e-5, rtol=1e-5)
        differences.append((_rescaled(pred, cond + d) - _rescaled(pred, cond)).abs().max().item())
        if i == 1:  # the same latents enter step 1 (CFG only before): the perturbation itself agrees
            their_cond, their_skip = theirs["outputs"][2], theirs["outputs"][4]
            assert (pert - cond - (their_skip - their_cond)).abs().max() < 1e-4
            assert (cond - their_cond).abs().max() < 1e-4
    assert max(differences) > 1e-3  # the two rescales are not the same computation


@pytest.mark.parametrize("name", ["QwenImageEditPipeline", "QwenImageEditPlusPipeline"])
def test_edit_pipelines_refuse_word_level_controls(pipe, name):
    """Qwen-Image-Edit's text stream holds the input image's vision tokens before the prompt (their count follows
    the image): word positions would be wrong, so word-level controls are refused by name, never misplaced."""
    import diffusers

    from attnctl.errors import ModelError

    edit = getattr(diffusers, name)(**pipe.components, processor=None)  # the real class and its template
    adapter = Session(edit).adapter  # the family is Qwen-Image's
    assert adapter.family == "qwenimage"
    with pytest.raises(ModelError, match=rf"{name}: .*vision tokens.*word-level controls \(excite, regions"):
        adapter.text_segments(edit)
