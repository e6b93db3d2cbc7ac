import numpy as np
import pytest

from attnctl.errors import AttnctlError
from attnctl.shapes.data import (
    COLOURS, SHAPES, VOCAB, Scene, ShapeObject, make_dataset, parse_caption, render, sample_scene, scene_rng,
)
from attnctl.tokenizers import build_clip_tokenizer


def test_dataset_is_deterministic_and_prefix_stable():
    a, ca, _ = make_dataset(20, seed=3)
    b, cb, _ = make_dataset(30, seed=3)
    c, cc, _ = make_dataset(20, seed=4)
    assert a.shape == (20, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b[:20]) and ca == cb[:20]
    assert not np.array_equal(a, c)


def test_scenes_respect_counts_and_do_not_overlap():
    for i in range(300):
        scene = sample_scene(scene_rng(0, i))
        assert 1 <= len(scene.objects) <= 3
        pairs = [(o.colour, o.shape) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)
        for j, o in enumerate(scene.objects):
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            for p in scene.objects[j + 1:]:
                assert x1 <= p.box[0] or p.box[2] <= x0 or y1 <= p.box[1] or p.box[3] <= y0


def test_captions_name_every_object_and_use_only_vocab():
    tok = build_clip_tokenizer(VOCAB)
    seen_styles = set()
    for i in range(300):
        scene = sample_scene(scene_rng(1, i))
        words = scene.caption.replace(",", " ,").split()  # three or more objects may be listed with commas
        assert set(words) <= set(VOCAB) | {","}
        parsed = parse_caption(scene.caption)
        assert [(p["colour"], p["shape"]) for p in parsed] == [(o.colour, o.shape) for o in scene.objects]
        # every word is a single token
        assert len(tok.tokenize(scene.caption)) == len(words)
        seen_styles.add(("small" in words or "large" in words, any(w in words for w in ("left", "top", "middle"))))
    assert len(seen_styles) >= 3


def test_render_puts_colour_inside_box_and_background_outside():
    obj = ShapeObject("red", "square", (0.25, 0.25, 0.75, 0.75))
    img = np.asarray(render(Scene(objects=(obj,)), 64)).astype(int)
    assert tuple(img[32, 32]) == COLOURS["red"]
    assert tuple(img[4, 4]) != COLOURS["red"]
    assert np.abs(img[4, 4] - np.array((244, 242, 236))).max() == 0


def test_all_shapes_and_colours_occur():
    _, _, scenes = make_dataset(200, seed=0)
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.size for o in objs} == {"small", "large"}


def test_bad_input_raises_attnctl_errors():
    with pytest.raises(AttnctlError, match="circle"):
        render(Scene(objects=(ShapeObject("red", "circel", (0.1, 0.1, 0.4, 0.4)),)))
    with pytest.raises(AttnctlError, match="colour"):
        parse_caption("a big thing")
    with pytest.raises(AttnctlError):
        sample_scene(np.random.default_rng(0), max_objects=5)
