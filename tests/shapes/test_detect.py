import numpy as np
import pytest
from PIL import Image

from attnctl.errors import AttnctlError
from attnctl.shapes.data import COLOURS, SHAPES, Scene, ShapeObject, render
from attnctl.shapes.detect import connected_components, detect
from attnctl.shapes.validate import BINDING, NEGLECTED, PRESENT, WRONG_COLOUR, box_iou, match, validate_detector


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", [0.19, 0.36])
def test_each_shape_alone_is_recognised_in_every_colour(shape, side):
    for colour in COLOURS:
        obj = ShapeObject(colour, shape, (0.3, 0.3, 0.3 + side, 0.3 + side))
        dets = detect(render(Scene(objects=(obj,)), 64))
        assert [(d.colour, d.shape) for d in dets] == [(colour, shape)], (colour, shape, dets)


def test_detector_accuracy_on_ground_truth_renders():
    # The full 1000-render figure is in the report; a few hundred here keep the default run fast.
    report = validate_detector(n=300, seed=2024)
    assert report.accuracy >= 0.98, report
    assert report.mean_iou >= 0.8


def test_box_and_pixel_count_follow_the_object():
    obj = ShapeObject("blue", "square", (0.25, 0.5, 0.5, 0.75))
    (det,) = detect(render(Scene(objects=(obj,)), 64))
    assert box_iou(det.box, obj.box) > 0.9
    assert abs(det.pixels - 16 * 16) <= 16


def test_empty_image_and_bad_input():
    assert detect(Image.new("RGB", (64, 64), (244, 242, 236))) == []
    with pytest.raises(AttnctlError, match="RGB"):
        detect(np.zeros((64, 64)))


def test_float_images_in_unit_range_are_accepted():
    obj = ShapeObject("green", "circle", (0.2, 0.2, 0.55, 0.55))
    img = np.asarray(render(Scene(objects=(obj,)))).astype(np.float32) / 255
    assert [(d.colour, d.shape) for d in detect(img)] == [("green", "circle")]


def test_connected_components_matches_a_brute_force_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((12, 12)) < 0.4
        comps = connected_components(mask)
        assert sum(len(c) for c in comps) == mask.sum()
        # every pixel's 4-neighbours in the mask lie in the same component
        owner = -np.ones(mask.shape, int)
        for k, c in enumerate(comps):
            owner[c[:, 0], c[:, 1]] = k
        for r, c in zip(*np.nonzero(mask)):
            for rr, cc in ((r + 1, c), (r, c + 1)):
                if rr < 12 and cc < 12 and mask[rr, cc]:
                    assert owner[rr, cc] == owner[r, c]


def _det(colour, shape):
    from attnctl.shapes.detect import Detection

    return Detection(colour, shape, (0, 0, 0.1, 0.1), 50)


def test_match_statuses():
    caption = "a red circle and a blue square"
    assert match(caption, [_det("red", "circle"), _det("blue", "square")]).all_present
    swapped = match(caption, [_det("blue", "circle"), _det("red", "square")])
    assert swapped.status == [BINDING, BINDING] and swapped.binding_error
    missing = match(caption, [_det("red", "circle")])
    assert missing.status == [PRESENT, NEGLECTED] and missing.neglect
    odd = match(caption, [_det("red", "circle"), _det("green", "square")])
    assert odd.status == [PRESENT, WRONG_COLOUR]
    extra = match("a red circle", [_det("red", "circle"), _det("red", "circle")])
    assert extra.all_present and extra.extra == [1]
    assert match([("red", "circle")], []).status == [NEGLECTED]
