"""Chroma (``tiny:chroma``): the adapter, stock equality under its attention mask and CFG call, the controls, bad
input. Real components: diffusers' ``ChromaPipeline`` with tiny random weights."""

import pytest
import torch
from recording import assert_only_head_perturbed

import attnctl
from attnctl.controls.maps import Maps
from attnctl.controls.perturb import Perturb
from attnctl.controls.regions import Regions
from attnctl.engine import Session, apply
from attnctl.errors import AttnctlError
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

from excite_checks import check_excite_raises_the_weakest_subject
from test_family_flux2 import Probe

PROMPT = "a red circle and a blue square"
JOINT = "transformer_blocks.0.attn"
SINGLE = "single_transformer_blocks.0.attn"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("chroma")


def kwargs(**overrides):
    return tiny_call_kwargs("chroma", **overrides)


def test_family_sites_and_the_pipeline_mask_reaches_the_control(pipe):
    session = Session(pipe)
    assert session.family == "chroma"
    assert [(s.name, s.kind, s.heads) for s in session.sites] == [
        (JOINT, "joint", 4), (SINGLE, "single", 4), ("single_transformer_blocks.1.attn", "single", 4)]
    probe = Probe([JOINT])
    with apply(pipe, probe):
        pipe(prompt=PROMPT, **kwargs(steps=1))
    kinds = [r["layout"].kind for r in probe.calls]
    assert kinds == ["cond_batch", "uncond_call"]  # CFG as a second call
    for record in probe.calls:
        assert record["text"] == slice(0, 32) and record["image"] == slice(32, 96)
        # (B, 1, S, S): the product of ChromaPipeline's 1/0 padding mask with itself, in the prompt's float dtype,
        # so SDPA adds it to the scores (+1 for kept pairs, +0 for padded ones) rather than masking: stock
        # diffusers 0.42.1 does exactly this, and attnctl passes it on unchanged.
        mask = record["bias"]
        assert mask.dtype == torch.float32 and mask.shape[1] == 1
        assert float(mask[0, 0, 40, 40]) == 1.0 and float(mask[0, 0, 40, 31]) == 0.0


def test_no_control_equals_stock_bit_for_bit_and_hooks_within_1e5(pipe):
    stock = pipe(prompt=PROMPT, **kwargs()).images
    with apply(pipe, []):
        assert torch.equal(pipe(prompt=PROMPT, **kwargs()).images, stock)
    with apply(pipe, Probe([s.name for s in Session(pipe).sites])) as run:
        hooked = pipe(prompt=PROMPT, **kwargs()).images
    torch.testing.assert_close(hooked, stock, atol=1e-5, rtol=0)
    assert run.attention_calls == 3 * 3 * 2


@pytest.mark.parametrize("site", [JOINT, SINGLE])
def test_perturbing_a_head_changes_only_that_head(pipe, site):
    probe = Probe([site])
    with apply(pipe, [Perturb(scale=1.0, layers=f"{site}:heads=2"), probe]):
        pipe(prompt=PROMPT, **kwargs(steps=2))
    records = [r for r in probe.calls if r["layout"].has("perturb")]
    assert records and all(r["layout"].kind == "cond_batch" for r in records)  # never on the uncond call
    for record in records:
        assert_only_head_perturbed(record, 2)


def test_pag_with_cfg_adds_exactly_scale_times_cond_minus_perturbed(pipe):
    """neg + w (cond - neg) + s (cond - perturbed): the uncond call takes the cond rows' delta, so the
    pipeline's own CFG keeps it once; checked on one step's noise prediction."""
    preds = {}

    def grab(name):
        def callback(p, i, t, tensors):
            preds[name] = tensors["latents"]
            return tensors
        return callback

    base = pipe(prompt=PROMPT, **kwargs(steps=1), callback_on_step_end=grab("plain")).images
    with apply(pipe, Perturb(scale=2.0, layers=[SINGLE])) as session:
        pag = pipe(prompt=PROMPT, **kwargs(steps=1)).images
    assert session.last_run()["controls"]["perturb"]["steps"] == [0]
    # perturbed branch alone, recomputed: scale 1 and scale 2 differ by exactly one more delta
    with apply(pipe, Perturb(scale=1.0, layers=[SINGLE])):
        half = pipe(prompt=PROMPT, **kwargs(steps=1)).images
    torch.testing.assert_close(pag - half, half - base, atol=1e-5, rtol=0)
    assert (pag - base).abs().max() > 1e-3


def test_hard_regions_confine_a_phrase_on_top_of_the_pipeline_mask(pipe):
    regions = Regions(regions=[{"phrase": "red circle", "box": [0, 0, 0.5, 1]},
                               {"phrase": "blue square", "box": [0.5, 0, 1, 1]}], mode="hard",
                      window={"start": 0, "stop": 1})
    probe = Probe([JOINT])
    with apply(pipe, [regions, probe]) as session:
        pipe(prompt=PROMPT, **kwargs(steps=1))
        cols = session.text_positions(0, "red circle")
    record = next(r for r in probe.calls if r["layout"].kind == "cond_batch")
    q, k = record["q"].double(), record["k"].double()
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + record["bias"].double(), dim=-1)
    image = record["image"]
    h, w = record["grid"]
    left = torch.arange(w).repeat(h) < w // 2
    to_red = probs[:, :, image][..., cols]
    assert bool((to_red[:, :, ~left] == 0).all()) and bool((to_red[:, :, left] > 0).all())
    assert bool((probs[:, :, image][..., 31] > 0).all())  # padding: scored +0 by the pipeline's float mask


def test_maps_are_the_image_queries_softmax_column(pipe):
    maps = Maps(words=["square"], layers=[SINGLE])
    probe = Probe([SINGLE])
    with apply(pipe, [maps, probe]) as session:
        pipe(prompt=PROMPT, **kwargs(steps=1))
        (at,) = session.text_positions(0, "square")
    record = next(r for r in probe.calls if r["layout"].kind == "cond_batch")
    q, k = record["q"].double(), record["k"].double()
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + record["bias"].double(), dim=-1)
    expected = probs[:, :, record["image"], at].mean(dim=1).reshape(1, 8, 8)
    torch.testing.assert_close(maps.maps["square"].double(), expected, atol=1e-5, rtol=1e-4)


def test_selector_naming_a_block_chroma_lacks(pipe):
    with pytest.raises(AttnctlError, match="single_transformer_blocks.9"):
        with apply(pipe, Perturb(layers=["single_transformer_blocks.9.attn"])):
            pass


def test_excite_raises_the_weakest_subject(pipe):
    """The weakest subject's max image->text attention after refinement at step 0 and an update at step 1,
    against the same run with a negligible step size (CFG's uncond call is left alone)."""
    check_excite_raises_the_weakest_subject(pipe, PROMPT, SINGLE, lambda: kwargs(steps=3))


def test_edit_word_swap_keeps_the_source_and_changes_the_target(pipe):
    from attnctl.controls.edit import Edit

    prompts = ["a red circle", "a blue circle"]
    with apply(pipe, Edit()):
        out = pipe(prompt=prompts, **kwargs(steps=2)).images
    plain = pipe(prompt=prompts, **kwargs(steps=2)).images
    torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=0)
    assert (out[1] - plain[1]).abs().max() > 1e-4  # the target follows the source's attention


def test_interpolate_anchors_are_plain_and_frames_move_between_them(pipe):
    from interpolation_checks import check_interpolation

    check_interpolation(pipe, "chroma")
