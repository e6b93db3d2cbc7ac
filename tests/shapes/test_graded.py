"""The graded ShapesBench score: continuous margins that keep the detector's verdict's order."""

import numpy as np

from attnctl.hunt import GradedShapesObjective, ShapesObjective
from attnctl.shapes.data import Scene, ShapeObject, make_dataset, render
from attnctl.shapes.graded import graded_score, prototypes

SWAP = {"circle": "square", "square": "circle", "triangle": "star", "star": "triangle"}


def _swap_first_shape(caption: str) -> str:
    for a, b in SWAP.items():
        if a in caption:
            return caption.replace(a, b, 1)
    return caption


def test_prototypes_separate_the_four_shapes():
    protos = prototypes()
    assert set(protos) == set(SWAP)
    means = np.stack([m for m, _ in protos.values()])
    gaps = [np.abs(means[i] - means[j]).max() for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) > 0.1  # every pair of shapes differs clearly in some feature


def test_true_captions_outscore_swapped_ones_on_renders():
    images, captions, _ = make_dataset(60, seed=9, min_objects=1, max_objects=3)
    true = np.array([graded_score(i, c) for i, c in zip(images, captions)])
    swapped = np.array([graded_score(i, _swap_first_shape(c)) for i, c in zip(images, captions)])
    assert true.mean() > 0.85 and swapped.mean() < 0.5
    assert (true > swapped).mean() >= 0.95


def test_an_absent_colour_scores_zero_and_a_blurred_shape_scores_between():
    from PIL import ImageFilter

    scene = Scene((ShapeObject("red", "square", (0.3, 0.3, 0.7, 0.7)),))
    sharp = render(scene, 64)
    soft = sharp.filter(ImageFilter.GaussianBlur(1.5))
    assert graded_score(sharp, "a blue square") == 0.0
    assert 0.0 < graded_score(soft, "a red square") < graded_score(sharp, "a red square") <= 1.0


def test_graded_objective_keeps_the_verdict_first_and_breaks_ties():
    images, captions, _ = make_dataset(12, seed=3, min_objects=1, max_objects=1)
    graded = GradedShapesObjective().score(images, captions)
    plain = ShapesObjective().score(images, captions)
    assert np.all((plain == 2.0) == (graded >= 1.0))  # all present <=> score >= 1, as in 'shapes'
    assert len(set(np.round(graded, 6))) > len(set(plain))  # fewer ties than the discrete score
