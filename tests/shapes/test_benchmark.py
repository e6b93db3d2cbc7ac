import numpy as np
import pytest

from attnctl.errors import AttnctlError
from attnctl.shapes.benchmark import generate, prompt_set, score_images
from attnctl.shapes.data import Scene, ShapeObject, parse_caption, render

_BOXES = [(0.1, 0.3, 0.4, 0.6), (0.55, 0.3, 0.85, 0.6)]


def _render_prompt(prompt, swap_colours=False):
    objs = parse_caption(prompt)
    colours = [o["colour"] for o in objs]
    if swap_colours:
        colours = colours[::-1]
    scene = Scene(objects=tuple(ShapeObject(c, o["shape"], b) for c, o, b in zip(colours, objs, _BOXES)))
    return np.asarray(render(scene))


def test_prompt_sets_are_seeded_and_cover_the_palette():
    single = prompt_set("single", 24, seed=1)
    assert single == prompt_set("single", 24, seed=1) and len(set(single)) == 24
    pairs = prompt_set("pair", 50, seed=1)
    for p in pairs:
        a, b = parse_caption(p)
        assert a["colour"] != b["colour"] and a["shape"] != b["shape"]
    with pytest.raises(AttnctlError):
        prompt_set("triple", 3)


def test_scores_of_ground_truth_and_swapped_renders():
    prompts = prompt_set("pair", 20, seed=0)
    good = score_images([_render_prompt(p) for p in prompts], prompts)
    assert good.all_present == 1.0 and good.binding_error == 0.0 and good.neglect == 0.0
    swapped = score_images([_render_prompt(p, swap_colours=True) for p in prompts], prompts)
    assert swapped.all_present == 0.0 and swapped.binding_error == 1.0
    blank = score_images([np.full((64, 64, 3), 240, np.uint8)] * 3, prompts[:3])
    assert blank.neglect == 1.0 and blank.object_recall == 0.0


def test_generate_runs_a_pipeline_with_per_prompt_seeds():
    from attnctl.testing import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    prompts = ["a red circle", "a blue star", "a red circle"]
    images = generate(pipe, prompts, seed=3, steps=2, size=32, batch_size=2)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    again = generate(pipe, prompts[:1], seed=3, steps=2, size=32)
    np.testing.assert_array_equal(images[0], again[0])  # prompt 0 -> seed 3, whatever the batching
