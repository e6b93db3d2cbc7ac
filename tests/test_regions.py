"""Region control: hard masks give exactly zero weight outside a region on every family (checked against a
float64 reference built here from the boxes), soft bias and off-switches, mask geometry, bad input."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from attnctl.controls.base import Control
from attnctl.controls.regions import Regions
from attnctl.engine import AttentionCall, apply
from attnctl.errors import ControlError, TokenError
from attnctl.masks import RegionGrids, box_coverage, mask_coverage, membership
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

PROMPT = "a red circle and a blue square"
RED, BLUE = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]  # left half; top-right quarter
REGIONS = [{"phrase": "red circle", "box": RED}, {"phrase": "blue square", "box": BLUE}]
SIZES = {"sd15": (32, 64), "sdxl": (64, 32), "sd3": (32, 64), "flux": (64, 32), "qwenimage": (32, 64)}  # (height, width), non-square


def _kwargs(family, **overrides):
    height, width = SIZES[family]
    return tiny_call_kwargs(family, **{"steps": 2, "height": height, "width": width, **overrides})


def _centre_inside(box, h, w) -> torch.Tensor:
    """Reference membership, independent of attnctl.masks: token centres inside the box. (h*w,) bool."""
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    inside = ((ys >= box[1]) & (ys < box[3]))[:, None] & ((xs >= box[0]) & (xs < box[2]))[None, :]
    return inside.flatten()


class Spy(Control):
    """Runs after the regions control: records probabilities over every key and checks the output."""

    name = "spy"

    def __init__(self):
        super().__init__()
        self.records = []

    def bind(self, session):
        return {s.name: None for s in session.sites if s.has_text}

    def on_attention(self, call):
        record = {"call": call, "q": call.q, "k": call.k, "v": call.v, "bias": call.bias,
                  "branches": call.layout.branches, "grid": call.grid, "text": call.text, "image": call.image,
                  "columns": {p: call.text_positions(call.layout.samples[-1], p) for p in ("red circle", "blue square")}}
        call.capture(list(range(call.k.shape[2])), lambda probs: record.__setitem__("probs", probs))
        call.then(lambda out: record.__setitem__("out", out) or out)
        self.records.append(record)


def _reference_bias(record, joint: bool) -> torch.Tensor:
    """(Sq, Sk) float64 0 / -inf from the boxes alone."""
    h, w = record["grid"]
    n_q, n_k = record["q"].shape[2], record["k"].shape[2]
    bias = torch.zeros(n_q, n_k, dtype=torch.float64)
    image = record["image"]
    for phrase, box in (("red circle", RED), ("blue square", BLUE)):
        outside = ~_centre_inside(box, h, w)
        columns = torch.tensor(record["columns"][phrase])
        block = torch.zeros(h * w, len(columns), dtype=torch.float64)
        block[outside] = float("-inf")
        bias[image][:, columns] = block
        if joint:
            bias[:, image][columns] = block.T
    return bias


def test_hard_mask_zero_weight_outside_each_family(family):
    pipe = tiny_pipeline(family)
    spy = Spy()
    with apply(pipe, [Regions(regions=REGIONS, mode="hard", window={"start": 0, "stop": 1}), spy]):
        pipe(PROMPT, **_kwargs(family))
    assert spy.records
    joint = family in ("sd3", "flux", "qwenimage")
    for record in spy.records:
        cond = [i for i, b in enumerate(record["branches"]) if b == "cond"]
        uncond = [i for i, b in enumerate(record["branches"]) if b == "uncond"]
        h, w = record["grid"]
        assert h * SIZES[family][1] == w * SIZES[family][0]  # the grid keeps the image's aspect ratio
        image = record["image"]
        probs = record["probs"].double()  # (B, H, Sq, Sk)
        for phrase, box in (("red circle", RED), ("blue square", BLUE)):
            inside = _centre_inside(box, h, w)
            columns = record["columns"][phrase]
            to_phrase = probs[cond][:, :, image][:, :, :, columns]  # image queries -> phrase keys
            assert bool((to_phrase[:, :, ~inside] == 0).all())
            assert bool((to_phrase[:, :, inside] > 0).all())
            if joint:  # phrase queries -> image keys
                from_phrase = probs[cond][:, :, columns][:, :, :, image]
                assert bool((from_phrase[..., ~inside] == 0).all())
                assert bool((from_phrase[..., inside] > 0).all())
            if uncond:  # unconditional rows are left alone
                assert bool((probs[uncond][:, :, image][:, :, :, columns] > 0).all())
        # Pad-token trap: the last text token stays visible to every query of every row.
        assert bool((probs[..., record["text"].stop - 1] > 0).all())
        # The processor honours the bias: its output equals a float64 masked attention built from the boxes.
        q, k, v = (record[n].double() for n in ("q", "k", "v"))
        bias = torch.zeros(len(record["branches"]), 1, q.shape[2], k.shape[2], dtype=torch.float64)
        bias[cond] = _reference_bias(record, joint)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
        expected = torch.softmax(scores, dim=-1) @ v
        torch.testing.assert_close(record["out"].double(), expected, atol=2e-5, rtol=1e-4)


def _state(pipe):
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return {"processors": dict(denoiser.attn_processors), "forward": denoiser.__dict__.get("forward"),
            "step": pipe.scheduler.__dict__.get("step"), "encode": pipe.__dict__.get("encode_prompt")}


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_off_switches_equal_plain_and_on_differs(family, mode):
    pipe = tiny_pipeline(family)
    before = _state(pipe)
    plain = pipe(PROMPT, **_kwargs(family)).images

    def run(**options):
        with apply(pipe, Regions(regions=REGIONS, mode=mode, self_weight=0.3, **options)):
            return pipe(PROMPT, **_kwargs(family)).images

    assert torch.equal(run(strength=0.0), plain)
    assert torch.equal(run(window={"start": 0.5, "stop": 0.5}), plain)
    # A window that no step reaches (steps are at progress 0 and 0.5) keeps the controlled path but adds nothing.
    assert (run(window={"start": 0.7, "stop": 0.9}) - plain).abs().max() <= 1e-5
    assert (run(window={"start": 0, "stop": 1}) - plain).abs().max() > 1e-4
    assert _state(pipe) == before


def test_soft_bias_values_and_shapes():
    """Soft bias on sd15: +-(1 - area) x strength x (t/1000)^5 on the phrase columns, (B, 1, Sq, 77) only."""
    pipe = tiny_pipeline("sd15")
    spy = Spy()
    control = Regions(regions=REGIONS, strength=2.0, window={"start": 0, "stop": 1})
    with apply(pipe, [control, spy]):
        pipe(PROMPT, **_kwargs("sd15"))
    for record in spy.records:
        bias = record["bias"]
        assert bias.shape == (2, 1, record["q"].shape[2], 77)  # uncond + cond rows, one head slice
        assert bool((bias[0] == 0).all())  # the unconditional row is untouched
        h, w = record["grid"]
        t = record["call"].step.timestep
        for phrase, box, area in (("red circle", RED, 0.5), ("blue square", BLUE, 0.25)):
            inside = _centre_inside(box, h, w)
            expected = 2.0 * (t / 1000) ** 5 * (1 - area) * torch.where(inside, 1.0, -1.0)
            for column in record["columns"][phrase]:
                torch.testing.assert_close(bias[1, 0, :, column], expected.float())
        others = [c for c in range(77) if c not in sum(record["columns"].values(), [])]
        assert bool((bias[1, 0][:, others] == 0).all())
    # Without CFG every row is controlled and one (1, 1, Sq, 77) tensor serves the whole batch.
    with apply(pipe, control):
        pipe([PROMPT] * 2, **_kwargs("sd15", guidance_scale=1.0))
    assert all(t.shape[:2] == (1, 1) and t.shape[-1] == 77 for t in control._cache.values())


def test_joint_bias_only_image_text_blocks():
    pipe = tiny_pipeline("flux")
    control = Regions(regions=REGIONS, mode="soft", window={"start": 0, "stop": 1})
    with apply(pipe, control):
        pipe(PROMPT, **_kwargs("flux"))
    (bias,) = control._cache.values()  # double- and single-stream blocks share one tensor
    n_text = 32
    assert bias.shape == (1, 1, n_text + 128, n_text + 128)  # 64x32 px -> 32x16 latents -> 16x8 packed tokens
    assert bool((bias[0, 0, :n_text, :n_text] == 0).all())  # text -> text untouched
    assert bool((bias[0, 0, n_text:, n_text:] == 0).all())  # image -> image untouched (self_weight 0)
    assert bool((bias[0, 0, n_text:, :n_text] != 0).any())
    torch.testing.assert_close(bias[0, 0, :n_text, n_text:], bias[0, 0, n_text:, :n_text].T)


def test_overlapping_regions_attend_both_phrases():
    pipe = tiny_pipeline("sd15")
    spy = Spy()
    left, right = [0.0, 0.0, 0.75, 1.0], [0.25, 0.0, 1.0, 1.0]
    regions = [{"phrase": "red circle", "box": left}, {"phrase": "blue square", "box": right}]
    with apply(pipe, [Regions(regions=regions, mode="hard", window={"start": 0, "stop": 1}), spy]):
        pipe(PROMPT, **_kwargs("sd15"))
    record = spy.records[0]
    h, w = record["grid"]
    both = _centre_inside(left, h, w) & _centre_inside(right, h, w)
    assert bool(both.any())
    probs = record["probs"][1]  # cond row
    for phrase in ("red circle", "blue square"):
        assert bool((probs[:, both][:, :, record["columns"][phrase]] > 0).all())


def test_mask_image_equals_box_and_bad_masks(tmp_path):
    pipe = tiny_pipeline("sd15")
    left = Image.new("L", (40, 20), 0)  # width x height: the 64x32 image's aspect ratio, another size
    left.paste(255, (0, 0, 20, 20))
    left.save(tmp_path / "left.png")
    outputs = []
    for region in ({"phrase": "red circle", "box": RED}, {"phrase": "red circle", "mask": str(tmp_path / "left.png")}):
        with apply(pipe, Regions(regions=[region], mode="hard", window={"start": 0, "stop": 1})):
            outputs.append(pipe(PROMPT, **_kwargs("sd15", height=32, width=64)).images)
    assert torch.equal(outputs[0], outputs[1])

    Image.new("RGB", (40, 20), "white").save(tmp_path / "rgb.png")
    with pytest.raises(ControlError, match=r"mode 'RGB'; allowed modes: L, 1"):
        Regions(regions=[{"phrase": "red", "mask": str(tmp_path / "rgb.png")}])
    Image.new("L", (40, 20), 0).save(tmp_path / "empty.png")
    with pytest.raises(ControlError, match="the mask is empty"):
        Regions(regions=[{"phrase": "red", "mask": str(tmp_path / "empty.png")}])
    with pytest.raises(ControlError, match="no such file"):
        Regions(regions=[{"phrase": "red", "mask": str(tmp_path / "missing.png")}])
    Image.new("1", (20, 20), 1).save(tmp_path / "square.png")
    control = Regions(regions=[{"phrase": "red circle", "mask": str(tmp_path / "square.png")}], mode="hard")
    with pytest.raises(ControlError, match=r"mask is 20x20 .* latent grid is 32x16"):
        with apply(pipe, control):
            pipe(PROMPT, **_kwargs("sd15", height=32, width=64))


@pytest.mark.parametrize("options, message", [
    ({"regions": [{"phrase": "red", "box": [0, 0, 1.5, 1]}]}, r"regions\.0\.box = \[0, 0, 1\.5, 1\]: .*in \[0, 1\]"),
    ({"regions": [{"phrase": "red", "box": [0.5, 0, 0.5, 1]}]}, r"regions\.0\.box .*zero area"),
    ({"regions": [{"phrase": "red", "box": [0, 0, 1]}]}, r"4 numbers"),
    ({"regions": [{"phrase": "red"}]}, r"exactly one of box"),
    ({"regions": [{"phrase": " ", "box": RED}]}, r"regions\.0\.phrase .*non-empty"),
    ({"regions": []}, r"regions = \[\]"),
    ({"regions": REGIONS, "mode": "medium"}, r"mode = 'medium': .*'hard' or 'soft'"),
    ({"regions": REGIONS, "strength": -1}, r"strength = -1"),
    ({"regions": REGIONS, "boxes": []}, r"unknown key 'boxes'"),
    ({"regions": [{"phrase": "red", "box": RED, "colour": 1}]}, r"colour"),
])
def test_bad_options(options, message):
    with pytest.raises(ControlError, match=message):
        Regions(options)


def test_phrase_not_in_prompt_shows_tokens_and_restores():
    pipe = tiny_pipeline("sd15")
    before = _state(pipe)
    control = Regions(regions=[{"phrase": "green star", "box": RED}])
    with pytest.raises(TokenError, match=r"'green star' is not in the prompt .* tokenizes as: 0:<\|startoftext\|>"):
        with apply(pipe, control):
            pipe(PROMPT, **_kwargs("sd15"))
    assert _state(pipe) == before


def test_layer_selector_with_heads():
    pipe = tiny_pipeline("sd15")
    spy = Spy()
    site = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    with apply(pipe, [Regions(regions=REGIONS, mode="hard", layers=[f"{site}:heads=1"],
                              window={"start": 0, "stop": 1}), spy]):
        pipe(PROMPT, **_kwargs("sd15"))
    records = [r for r in spy.records if r["call"].site.name == site]
    others = [r for r in spy.records if r["call"].site.name != site]
    assert records and others and all(r["bias"] is None for r in others)
    bias = records[0]["bias"]
    assert bias.shape[:2] == (2, 4) and bool(torch.isinf(bias[1, 1]).any())
    assert bool((bias[:, [0, 2, 3]] == 0).all())


# -- geometry ----------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 7), st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_mask_coverage_is_exact_area_average(big_h, big_w, h, w, seed):
    mask = torch.rand(big_h, big_w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # Reference: upsample by nearest to a common multiple, then average blocks.
    fine = mask.repeat_interleave(h, dim=0).repeat_interleave(w, dim=1)  # (big_h*h, big_w*w)
    expected = fine.reshape(h, big_h, w, big_w).mean(dim=(1, 3))
    torch.testing.assert_close(mask_coverage(mask, h, w), expected)


@pytest.mark.parametrize("h, w", [(8, 4), (4, 8), (3, 5), (16, 16)])
def test_box_coverage_matches_rendered_mask(h, w):
    box = [0.1, 0.25, 0.7, 0.9]
    n = 240
    pixels = (torch.arange(n) + 0.5) / n
    rendered = (((pixels > box[1]) & (pixels < box[3]))[:, None] & ((pixels > box[0]) & (pixels < box[2]))[None, :])
    torch.testing.assert_close(box_coverage(box, h, w), mask_coverage(rendered.double(), h, w))


def test_region_grids_non_square_cached_and_never_empty():
    grids = RegionGrids([RED, BLUE, [0.0, 0.0, 0.05, 0.05]], complement=True)
    for h, w in ((8, 4), (4, 8), (2, 2)):
        inside = grids.inside(h, w)
        assert inside.shape == (4, h * w)
        torch.testing.assert_close(inside[0], _centre_inside(RED, h, w))
        torch.testing.assert_close(inside[1], _centre_inside(BLUE, h, w))
        assert int(inside[2].sum()) == 1 and bool(inside[2][0])  # tiny box: its most-covered token
        torch.testing.assert_close(inside[3], ~inside[:3].any(dim=0))
        assert grids.inside(h, w) is inside  # cached per grid
    assert bool(membership(torch.tensor([[0.5, 0.49]])).tolist() == [True, False])


def test_add_bias_to_boolean_mask():
    """Engine: a boolean attention mask (True = may attend) plus an additive bias stays a mask."""
    q = torch.zeros(1, 1, 2, 4)
    call = AttentionCall(SimpleNamespace(frame=None), None, q, q, q, None, slice(0, 2),
                         bias=torch.tensor([[True, False], [True, True]]))
    call.add_bias(torch.ones(2, 2))
    expected = torch.tensor([[1.0, float("-inf")], [1.0, 1.0]])
    torch.testing.assert_close(call.bias[0, 0], expected)


def test_sd3_attention_mask_is_left_to_the_processor():
    """attnctl no longer replaces JointAttnProcessor2_0 (its old copy honoured ``attention_mask``): the stock
    processor runs, and it drops the mask, under apply exactly as without it."""
    pipe = tiny_pipeline("sd3")
    attn = pipe.transformer.transformer_blocks[1].attn
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(1, 16, 32, generator=gen), torch.randn(1, 5, 32, generator=gen)
    mask = torch.ones(21, 21, dtype=torch.bool)
    mask[:16, 16:18] = False  # image queries may not see the first two text tokens
    stock_masked = attn(image, text, attention_mask=mask)
    stock_plain = attn(image, text)
    with apply(pipe):
        ours_masked = attn(image, text, attention_mask=mask)
        ours_plain = attn(image, text)
    torch.testing.assert_close(stock_masked[0], stock_plain[0])  # diffusers ignores the mask
    assert torch.equal(ours_plain[0], stock_plain[0]) and torch.equal(ours_masked[0], stock_masked[0])


# -- the layout evaluation suite -----------------------------------------------------------------------------
def test_layout_cases_lines_and_fill():
    from attnctl.evals import get_suite
    from attnctl.evals.layout import built_in_layouts

    suite = get_suite("layout")
    layouts = built_in_layouts()
    assert len(layouts) >= 40 and sum(len(r) == 2 for _, r in layouts) >= 40
    assert len(suite.cases(None, 8)) == 8 * len(layouts)
    line = "a red circle and a blue square | red circle: 0,0,0.5,1 | square: 0.5, 0, 1, 1"
    (case,) = suite.cases([line], 1)
    assert case.prompt == "a red circle and a blue square"
    assert case.info["regions"][1] == {"phrase": "square", "box": [0.5, 0.0, 1.0, 1.0], "object": ["blue", "square"]}
    filled = suite.controls_for({"regions": {"regions": [{"phrase": "x", "box": [0, 0, 1, 1]}], "mode": "hard"},
                                 "maps": {"words": ["red"]}}, case)
    assert filled["regions"] == {"mode": "hard", "regions": [{"phrase": "red circle", "box": [0.0, 0.0, 0.5, 1.0]},
                                                             {"phrase": "square", "box": [0.5, 0.0, 1.0, 1.0]}]}
    assert filled["maps"] == {"words": ["red"]}


@pytest.mark.parametrize("line, message", [
    ("a red circle", r"line 1: .*at least one region"),
    ("a red circle | red circle 0,0,1,1", r"line 1: region 'red circle 0,0,1,1': write 'PROMPT \| PHRASE"),
    ("a red circle | red circle: 0,0,1", r"write 'PROMPT"),
    ("a red circle | red circle: 0,0,1.5,1", r"in \[0, 1\]"),
    ("a red circle | red thing: 0,0,1,1", r"names no shape"),
    ("a red circle and a blue circle | circle: 0,0,1,1", r"in 2 colours"),
])
def test_layout_bad_lines(line, message):
    from attnctl.errors import AttnctlError
    from attnctl.evals import get_suite

    with pytest.raises(AttnctlError, match=message):
        get_suite("layout").cases([line], 1)


def test_layout_scores_ground_truth_renders():
    import numpy as np

    from attnctl.evals import get_suite
    from attnctl.shapes.data import Scene, ShapeObject, render
    from attnctl.shapes.validate import box_iou

    suite = get_suite("layout")
    (case,) = suite.cases(["a red circle and a blue square | red circle: 0,0,0.5,1 | blue square: 0.5,0,1,1"], 1)
    circle, square = (0.1, 0.3, 0.4, 0.6), (0.6, 0.3, 0.9, 0.6)
    placed = np.asarray(render(Scene((ShapeObject("red", "circle", circle), ShapeObject("blue", "square", square)))))
    scores = suite.score(case, placed)
    assert scores["inside_region"] == 1.0 and scores["detected"] == 1.0
    expected = (box_iou([0, 0, 0.5, 1], circle) + box_iou([0.5, 0, 1, 1], square)) / 2
    assert abs(scores["mean_iou"] - expected) < 0.05  # the detector's boxes are within a pixel or two
    swapped = np.asarray(render(Scene((ShapeObject("red", "circle", square), ShapeObject("blue", "square", circle)))))
    assert suite.score(case, swapped)["inside_region"] == 0.0
    alone = np.asarray(render(Scene((ShapeObject("red", "circle", circle),))))
    scores = suite.score(case, alone)
    assert scores["inside_region"] == 0.5 and scores["detected"] == 0.5 and scores["inside_if_detected"] == 1.0


def test_layout_eval_runs_with_the_shipped_recipe(tmp_path):
    import json

    from attnctl.evals import run_eval

    prompts = tmp_path / "layouts.txt"
    prompts.write_text("a red circle and a blue square | red circle: 0,0,0.5,1 | blue square: 0.5,0,1,1\n")
    recipe = tmp_path / "r.yaml"
    shipped = Path(__file__).parent.parent / "recipes" / "regions.yaml"
    recipe.write_text(shipped.read_text().replace("steps: 25", "steps: 2"))
    out = tmp_path / "layout.json"
    run_eval("layout", recipe=str(recipe), prompts=str(prompts), seeds=1, json_path=str(out), progress=False)
    report = json.loads(out.read_text())
    assert report["n"] == 1 and set(report["baseline"]) == {"inside_region", "mean_iou", "detected",
                                                             "inside_if_detected"}
    assert report["settings"]["controls"]["regions"]["mode"] == "soft"
    assert report["controlled"] is not None and set(report["delta_ci95"]) >= {"inside_region", "mean_iou"}
