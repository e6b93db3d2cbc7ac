"""The edit control: invariants on every family, exact map swaps, alignment, local blend, errors, ShapesWorld."""

import numpy as np
import pytest
import torch

import attnctl
from attnctl.adapters.base import TextSegment
from attnctl.align import align_prompts
from attnctl.controls.base import Control
from attnctl.controls.edit import Edit
from attnctl.engine import apply
from attnctl.errors import ControlError
from attnctl.testing import tiny_call_kwargs, tiny_pipeline
from attnctl.tokenizers import build_clip_tokenizer

PAIR = ["a red circle", "a blue circle"]
OFF = {"cross": {"window": {"stop": 0.0}}, "self_attention": {"window": {"stop": 0.0}},
       "joint": {"window": {"stop": 0.0}}}


def _kwargs(family, prompts, **overrides):
    kwargs = tiny_call_kwargs(family, **overrides)
    kwargs["generator"] = [torch.Generator().manual_seed(0) for _ in prompts]
    return kwargs


def _processors(pipe):
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return dict(denoiser.attn_processors), pipe.scheduler.__dict__.get("step")


def test_empty_windows_equal_plain_and_swap_changes_only_the_target(family, pipe):
    before = _processors(pipe)
    plain = pipe(PAIR, **_kwargs(family, PAIR)).images
    alone = pipe(PAIR[1], **tiny_call_kwargs(family)).images
    with apply(pipe, Edit(OFF)):
        off = pipe(PAIR, **_kwargs(family, PAIR)).images
    with apply(pipe, Edit({"cross": {"window": {"stop": 0.8}}})):
        swapped = pipe(PAIR, **_kwargs(family, PAIR)).images
    assert torch.equal(off, plain)
    assert (off[1] - alone[0]).abs().max() <= 1e-4  # batch of two vs one: float32 blocking only
    assert torch.equal(swapped[0], plain[0])  # the source row is never changed
    assert (swapped[1] - plain[1]).abs().max() > 1e-3
    assert _processors(pipe) == before


def test_cross_swap_without_maps_equals_materialised_maps():
    """A word swap copies the source's queries and keys (no maps); reweighting by 1 materialises the maps."""
    pipe = tiny_pipeline("sd15")
    only_cross = {"self_attention": {"window": {"stop": 0.0}}, "cross": {"window": {"stop": 1.0}}}
    with apply(pipe, Edit(only_cross)):
        fast = pipe(PAIR, **_kwargs("sd15", PAIR)).images
    with apply(pipe, Edit(only_cross, reweight={"blue": 1.0})):
        slow = pipe(PAIR, **_kwargs("sd15", PAIR)).images
    with apply(pipe, Edit(only_cross, reweight={"blue": 3.0})):
        heavier = pipe(PAIR, **_kwargs("sd15", PAIR)).images
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)
    assert (heavier[1] - fast[1]).abs().max() > 1e-3 and torch.equal(heavier[0], fast[0])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_blocks_equal_projection_copy(family):
    """All four map blocks from the source (materialised) == the source's queries and keys (SDPA)."""
    pipe = tiny_pipeline(family)
    window = {"start": 0.0, "stop": 1.0}
    blocks = {"joint": {"window": window, "inject": [], "blocks": ["image->image", "image->text", "text->image",
                                                                   "text->text"]}}
    copy = {"joint": {"window": window, "inject": ["q_image", "k_image", "q_text", "k_text"]}}
    outs = []
    for options in (blocks, copy):
        with apply(pipe, Edit(options)):
            outs.append(pipe(PAIR, **_kwargs(family, PAIR)).images)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    assert (outs[0][1] - pipe(PAIR, **_kwargs(family, PAIR)).images[1]).abs().max() > 1e-4


def test_alignment():
    tok = build_clip_tokenizer()
    segments = [TextSegment(tok, 0, 77)]
    same = align_prompts(segments, "a red circle", "a blue circle", "swap", 77)
    assert same.identity
    refine = align_prompts(segments, "a red circle", "a small red circle", "refine", 77)
    # tokens: <bos> a red circle <eos> vs <bos> a small red circle <eos>: 'small' (2) keeps its own map
    assert refine.own[2] == 1 and refine.own.sum() == 1
    assert refine.matrix[1, 1] == 1 and refine.matrix[2, 3] == 1 and refine.matrix[3, 4] == 1  # a, red, circle
    assert refine.matrix[4, 5] == 1 and refine.matrix[5, 6] == 1  # <eos> and padding follow the prompt's end
    assert torch.allclose(refine.matrix.sum(0)[refine.own == 0], torch.ones(76, dtype=torch.float64))
    with pytest.raises(ControlError, match=r"only in the target: 'small'.*kind 'refine'"):
        align_prompts(segments, "a red circle", "a small red circle", "swap", 77)


def test_errors_name_the_problem():
    pipe = tiny_pipeline("sd15")
    with pytest.raises(ControlError, match=r"reweight: 'green' is not in the prompt 'a blue circle'"):
        with apply(pipe, Edit(kind="reweight", reweight={"green": 2.0})):
            pipe(PAIR, **_kwargs("sd15", PAIR))
    with pytest.raises(ControlError, match=r"only in the target: 'big'"):
        with apply(pipe, Edit()):
            pipe(["a red circle", "a big blue circle"], **_kwargs("sd15", [0, 1]))
    with pytest.raises(ControlError, match=r"kind 'reweight' needs reweight"):
        Edit(kind="reweight")
    with pytest.raises(ControlError, match="even number"):
        with apply(pipe, Edit(pairs="pairs")):
            pipe(["a red circle"] * 3, **_kwargs("sd15", [0, 1, 2]))
    with pytest.raises(ControlError, match="unknown key 'windows'"):
        Edit(cross={"windows": {}})
    assert _processors(pipe)[1] is None


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_user_mask_of_zeros_keeps_the_source_everywhere(family):
    pipe = tiny_pipeline(family)
    control = Edit(mask=np.zeros((32, 32), np.float32))  # a mask alone turns the blend on
    with apply(pipe, control):
        out = pipe(PAIR, **_kwargs(family, PAIR)).images
    torch.testing.assert_close(out[1], out[0], atol=1e-6, rtol=0)
    half = np.zeros((32, 32), np.float32)
    half[:, 16:] = 1
    with apply(pipe, Edit(blend={}, mask=half)):
        out = pipe(PAIR, **_kwargs(family, PAIR)).images
    assert (out[1] - out[0]).abs().max() > 1e-4


class Nudge(Control):
    name = "nudge"

    def after_step(self, step, latents):
        return latents + 1.0 if step.index == 0 else None


def test_after_step_hook_follows_a_scheduler_swapped_inside_apply():
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline("sd15")
    original, ddim = pipe.scheduler, DDIMScheduler.from_config(pipe.scheduler.config)
    kwargs = lambda: tiny_call_kwargs("sd15", steps=1)  # noqa: E731
    plain = pipe("a red circle", **kwargs()).images
    with apply(pipe, Nudge()):
        nudged = pipe("a red circle", **kwargs()).images
        pipe.scheduler = ddim
        swapped = pipe("a red circle", **kwargs()).images
        pipe.scheduler = original
        back = pipe("a red circle", **kwargs()).images
    torch.testing.assert_close(nudged, plain + 1.0, atol=1e-5, rtol=0)
    pipe.scheduler = ddim
    torch.testing.assert_close(swapped, pipe("a red circle", **kwargs()).images + 1.0, atol=1e-5, rtol=0)
    torch.testing.assert_close(back, nudged, atol=0, rtol=0)
    assert "step" not in ddim.__dict__ and "step" not in original.__dict__


@pytest.fixture(scope="module")
def shapes():
    return attnctl.load("shapes")


def _detect(image):
    from attnctl.shapes.detect import detect

    return detect(np.asarray(image))


def _iou(a, b):
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# recipes/edit.yaml's options: injection windows and a local blend on the words that change and the object noun.
SHIPPED = {"cross": {"window": {"stop": 0.8}}, "self_attention": {"window": {"stop": 0.4}, "inject": "maps"}}


def test_shapes_colour_and_shape_swaps_keep_the_object(shapes):
    """Every edit draws the target object; it stays in place (box IoU >= 0.5) in at least 5 of 6 edits (on
    shapes v2, seed 1's colour swap moves the circle: IoU 0.28; `attnctl eval edit` measures the rate)."""
    from attnctl.editing import edit

    ious = []
    for seed in (0, 1, 2):
        for source, target, words in [("a red circle", "a blue circle", ["red", "blue", "circle"]),
                                      ("a red circle", "a red square", ["red", "circle", "square"])]:
            options = {**SHIPPED, "blend": {"words": words, "threshold": 0.3, "dilate": 1}}
            result = edit(shapes, source, target, seed=seed, steps=25, guidance_scale=4.5, options=options)
            (src,), (tgt,) = _detect(result.source), _detect(result.target)
            assert (src.colour, src.shape) == tuple(source.split()[1:])
            assert (tgt.colour, tgt.shape) == tuple(target.split()[1:])
            assert result.mask is not None and 0 < result.mask.mean() < 1
            ious.append(_iou(src.box, tgt.box))
    assert sum(iou >= 0.5 for iou in ious) >= 5, ious


@pytest.mark.xfail(strict=True, reason="known regression on shapes v2: with edit's default options (no injection "
                   "windows, blend on the changed words only) a red -> blue colour swap comes out as purple and blue "
                   "fragments; the shipped recipe's options (test above) swap it cleanly")
def test_shapes_colour_swap_with_default_options(shapes):
    from attnctl.editing import edit

    result = edit(shapes, "a red circle", "a blue circle", seed=1, steps=25, guidance_scale=4.5, options={"blend": {}})
    (tgt,) = _detect(result.target)
    assert (tgt.colour, tgt.shape) == ("blue", "circle")


def test_shapes_real_image_edit(shapes):
    from attnctl.editing import edit
    from attnctl.inversion import psnr
    from attnctl.shapes.data import ShapeObject, Scene, render

    image = render(Scene((ShapeObject("red", "circle", (0.3, 0.3, 0.7, 0.7)),), "a red circle"))
    result = edit(shapes, "a red circle", "a blue circle", image=image, steps=10, guidance_scale=4.5)
    assert psnr(np.asarray(image), np.asarray(result.source)) >= 28.0
    (tgt,) = _detect(result.target)
    assert tgt.colour == "blue" and _iou(tgt.box, (0.3, 0.3, 0.7, 0.7)) >= 0.7


def test_real_image_edit_keeps_the_inversion_fix_when_a_negative_prompt_is_passed(shapes):
    """The null-text fix gives the source row the source prompt as its negative; a ``negative_prompt`` passed
    to ``edit`` is for the other rows only and must not replace the fix (it used to, after the inversion)."""
    from attnctl.editing import edit
    from attnctl.shapes.data import ShapeObject, Scene, render

    image = render(Scene((ShapeObject("red", "circle", (0.3, 0.3, 0.7, 0.7)),), "a red circle"))
    plain = edit(shapes, "a red circle", "a blue circle", image=image, steps=4, guidance_scale=4.5)
    given = edit(shapes, "a red circle", "a blue circle", image=image, steps=4, guidance_scale=4.5,
                 negative_prompt="")
    assert np.array_equal(np.asarray(plain.source), np.asarray(given.source))
    other = edit(shapes, "a red circle", "a blue circle", image=image, steps=4, guidance_scale=4.5,
                 negative_prompt="a green square")
    assert np.array_equal(np.asarray(plain.source), np.asarray(other.source))
    assert not np.array_equal(np.asarray(plain.target), np.asarray(other.target))


def test_run_writes_source_target_and_mask(tmp_path, shapes):
    import json

    from PIL import Image

    from attnctl.recipe import load_recipe
    from attnctl.run import run_recipe
    from attnctl.shapes.data import ShapeObject, Scene, render

    render(Scene((ShapeObject("green", "square", (0.2, 0.2, 0.6, 0.6)),), "")).save(tmp_path / "real.png")
    for extra in ({}, {"image": str(tmp_path / "real.png")}):
        recipe = load_recipe({"model": "shapes", "prompt": "a green square", "steps": 4, "guidance_scale": 4.5,
                              "controls": {"edit": {"target": "a green circle", "blend": {}, **extra}}})
        folder = run_recipe(recipe, out=tmp_path / "runs", progress=False, pipe=shapes)
        (entry,) = json.loads((folder / "run.json").read_text())["images"]
        assert set(entry["files"]) == {"source", "mask"} and entry["info"]["target_prompt"] == "a green circle"
        assert Image.open(folder / entry["files"]["mask"]).mode == "L"
        assert "edit" in entry["diagnostics"] and entry["diagnostics"]["edit"]["pairs"] == [[0, 1]]
    missing = load_recipe({"model": "shapes", "prompt": "a green square", "steps": 2, "controls": {"edit": {}}})
    with pytest.raises(ControlError, match="controls.edit.target"):
        run_recipe(missing, out=tmp_path / "runs", progress=False, pipe=shapes)


def test_edit_eval_suite_smoke(tmp_path, shapes):
    from attnctl.evals import run_eval

    prompts = tmp_path / "edits.txt"
    prompts.write_text("# source -> target\na red circle -> a blue circle\na green square -> a green star\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 4\nprompt: x\ncontrols:\n  edit: {target: unused, blend: {words: [unused]}}\n")
    report = run_eval("edit", recipe=str(recipe), prompts=str(prompts), seeds=1, pipe=shapes, progress=False,
                      json_path=str(tmp_path / "edit.json"))
    assert report["n"] == 2 and set(report["delta_ci95"]) <= {"edit_success", "box_iou", "background_psnr"}
    row = report["rows"][0]
    assert row["info"]["kind"] == "colour" and report["rows"][1]["info"]["kind"] == "shape"
    for key in ("baseline", "controlled"):
        assert row[key]["edit_success"] in (0.0, 1.0) and row[key]["background_psnr"] > 10
    with pytest.raises(Exception, match="source -> target"):
        prompts.write_text("a red circle\n")
        run_eval("edit", prompts=str(prompts), seeds=1, pipe=shapes, progress=False)


def test_builtin_edits_change_exactly_one_attribute():
    from attnctl.evals.edit import builtin_edits

    edits = builtin_edits()
    assert len(edits) >= 40 and len(set(edits)) == len(edits)
    for source, target in edits:
        changed = [a != b for a, b in zip(source.split(), target.split())]
        assert sum(changed) == 1, (source, target)


# -- several images per prompt -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_images_per_prompt_pair_image_i_of_the_source_with_image_i_of_each_target(family):
    """``[source, target]`` with ``num_images_per_prompt=2`` is two edits: samples are prompt-major (0, 1 the
    source's images, 2, 3 the target's), so the pairs are (0, 2) and (1, 3). Each image equals the same edit run
    alone with its seed (float32 batch blocking only), and the source images are never changed."""
    pipe = tiny_pipeline(family)
    seeds = lambda *s: [torch.Generator().manual_seed(i) for i in s]  # noqa: E731
    kwargs = lambda gens, **extra: tiny_call_kwargs(family, generator=gens, **extra)  # noqa: E731
    plain = pipe(PAIR, **kwargs(seeds(0, 1, 0, 1), num_images_per_prompt=2)).images
    control = Edit()
    with apply(pipe, control) as session:
        both = pipe(PAIR, **kwargs(seeds(0, 1, 0, 1), num_images_per_prompt=2)).images
        assert session.last_run()["controls"]["edit"]["pairs"] == [[0, 2], [1, 3]]
        alone = [pipe(PAIR, **kwargs(seeds(i, i))).images for i in (0, 1)]
    assert torch.equal(both[:2], plain[:2])  # the source rows are never changed
    assert (both[2:] - plain[2:]).abs().max() > 1e-3
    worst = max((both[[i, 2 + i]] - alone[i]).abs().max().item() for i in (0, 1))
    assert worst <= 1e-4, f"max abs difference {worst:.3g}"


def test_images_per_prompt_with_pairs_of_prompts():
    pipe = tiny_pipeline("sd15")
    prompts = ["a red circle", "a blue circle", "a red square", "a green square"]
    gens = [torch.Generator().manual_seed(i % 2) for i in range(8)]
    with apply(pipe, Edit(pairs="pairs")) as session:
        pipe(prompts, **tiny_call_kwargs("sd15", steps=1, generator=gens, num_images_per_prompt=2))
    assert session.last_run()["controls"]["edit"]["pairs"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    with pytest.raises(ControlError, match=r"pairs = 'pairs'.*even number of prompts.*got 3"):
        with apply(pipe, Edit(pairs="pairs")):
            pipe(prompts[:3], **tiny_call_kwargs("sd15", steps=1, num_images_per_prompt=2))


@pytest.mark.parametrize("field, options", [
    ("cross.layers", {"cross": {"layers": ["down_blocks.1:heads=0"]}}),
    ("self_attention.layers", {"self_attention": {"layers": ["mid_block:heads=1,2"]}}),
    ("blend.layers", {"blend": {"layers": ["up_blocks.1:heads=0"]}}),
])
def test_heads_in_edit_selectors_are_an_error(field, options):
    """Edits act on every head of a layer: a ``:heads=`` part used to be ignored silently."""
    pipe = tiny_pipeline("sd15")
    with pytest.raises(ControlError, match=rf"{field}.*:heads=.*every head"):
        with apply(pipe, Edit(options)):
            pass
