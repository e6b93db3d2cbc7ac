"""A graded ShapesBench score: how clearly each named object is drawn, not only whether it is.

The detector's verdict is discrete (an object is present or not), so many images, and many candidate settings of a
search such as ``attnctl hunt``, tie. This score keeps the verdict's meaning and adds margins:

* each named object scores the best of the detections in its colour: ``exp(-d^2 / 2)``, where ``d`` is the
  distance of the detection's shape features (box fill, solidity, where it is widest, corner cover) from the
  named shape's prototype in units of that shape's own spread, both measured on ground-truth renders; a shape
  drawn exactly as the renderer draws it scores 1, a circle asked to be a square far less;
* the image's score is the mean over the named objects (0 for one not drawn in its colour at all), so it moves
  smoothly as an object sharpens, and it is highest where the detector would say "all present".

``graded_score(image, prompt) -> float in [0, 1]``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .data import SHAPES, make_dataset
from .detect import Detection, detect
from .validate import expected_objects

_FEATURES = ("fill", "solidity", "widest", "corners")
# Renders are nearly exact, so their spread alone would call any generated (softer) shape far off; 0.08 of a
# feature's unit range tolerates the blur the embedded VAE adds (its reconstructions keep scores near 1).
_MIN_SPREAD = 0.08


def _features(d: Detection) -> np.ndarray:
    return np.array([getattr(d, f) for f in _FEATURES], dtype=np.float64)


@lru_cache(maxsize=1)
def prototypes(n: int = 400, seed: int = 4242) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per shape: mean and spread (standard deviation, at least ``_MIN_SPREAD``) of the detector's features on ``n``
    ground-truth renders of single objects (about a second, once per process)."""
    images, _, scenes = make_dataset(n, seed=seed, min_objects=1, max_objects=1)
    feats: dict[str, list[np.ndarray]] = {s: [] for s in SHAPES}
    for image, scene in zip(images, scenes):
        dets = detect(image)
        if dets:
            feats[scene.objects[0].shape].append(_features(dets[0]))
    out = {}
    for shape, rows in feats.items():
        arr = np.stack(rows)
        out[shape] = (arr.mean(0), np.maximum(arr.std(0), _MIN_SPREAD))
    return out


def object_score(detections: list[Detection], colour: str, shape: str) -> float:
    """How well the best detection in ``colour`` looks like ``shape``: 1 at the prototype, 0 with no such colour."""
    mean, spread = prototypes()[shape]
    best = 0.0
    for d in detections:
        if d.colour == colour:
            dist2 = float((((_features(d) - mean) / spread) ** 2).mean())
            best = max(best, float(np.exp(-dist2 / 2)))
    return best


def graded_score(image, prompt: str) -> float:
    """Mean over the objects ``prompt`` names of ``object_score`` on ``image`` (an array or PIL image)."""
    expected = expected_objects(prompt)
    if not expected:
        return 0.0
    dets = detect(image)
    return float(np.mean([object_score(dets, c, s) for c, s in expected]))


__all__ = ["graded_score", "object_score", "prototypes"]
