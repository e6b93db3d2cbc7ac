"""Scoring detections against a scene or a caption, and validating the detector on ground-truth renders.

``match`` is what the benchmark suites use: for each object a caption names, is it there (colour and shape),
neglected (no object of that shape at all), or mis-bound (its shape is there, but in the colour of another
object the caption names)?
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .data import Scene, ShapeObject, ShapesError, make_dataset, parse_caption
from .detect import Detection, detect

# Outcomes of one expected object.
PRESENT, BINDING, WRONG_COLOUR, NEGLECTED = "present", "binding_error", "wrong_colour", "neglected"


@dataclass
class MatchResult:
    """Per expected object, in caption order: ``status`` is one of present / binding_error / wrong_colour /
    neglected, ``detection`` the index of the detection it was matched to (or ``None``)."""

    expected: list[tuple[str, str]]
    status: list[str]
    detection: list[int | None]
    extra: list[int] = field(default_factory=list)  # detections matched to nothing

    @property
    def all_present(self) -> bool:
        return all(s == PRESENT for s in self.status)

    @property
    def n_present(self) -> int:
        return sum(s == PRESENT for s in self.status)

    @property
    def neglect(self) -> bool:
        return any(s == NEGLECTED for s in self.status)

    @property
    def binding_error(self) -> bool:
        return any(s == BINDING for s in self.status)


def expected_objects(target) -> list[tuple[str, str]]:
    """``(colour, shape)`` pairs from a ``Scene``, a caption string, or a list of objects / dicts / pairs."""
    if isinstance(target, Scene):
        return [(o.colour, o.shape) for o in target.objects]
    if isinstance(target, str):
        return [(o["colour"], o["shape"]) for o in parse_caption(target)]
    out = []
    for item in target:
        if isinstance(item, (ShapeObject, Detection)):
            out.append((item.colour, item.shape))
        elif isinstance(item, dict):
            out.append((item["colour"], item["shape"]))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append((str(item[0]), str(item[1])))
        else:
            raise ShapesError(f"cannot read an expected object from {item!r}; give (colour, shape) or a dict")
    return out


def match(target, detections: list[Detection]) -> MatchResult:
    """Match the objects of ``target`` (scene, caption or object list) one-to-one with ``detections``.

    Exact colour+shape matches are taken first (largest detection first). For each remaining object:
    ``binding_error`` when an unmatched detection has its shape and the colour of another expected object,
    ``wrong_colour`` when its shape is there in some other colour, ``neglected`` when its shape is absent.
    """
    expected = expected_objects(target)
    colours = [c for c, _ in expected]
    free = list(range(len(detections)))
    status: list[str | None] = [None] * len(expected)
    assigned: list[int | None] = [None] * len(expected)
    for i, (colour, shape) in enumerate(expected):
        for j in free:
            if detections[j].colour == colour and detections[j].shape == shape:
                status[i], assigned[i] = PRESENT, j
                free.remove(j)
                break
    for i, (colour, shape) in enumerate(expected):
        if status[i] is not None:
            continue
        others = {c for k, c in enumerate(colours) if k != i and c != colour}
        same_shape = [j for j in free if detections[j].shape == shape]
        bound = [j for j in same_shape if detections[j].colour in others]
        if bound:
            status[i], assigned[i] = BINDING, bound[0]
            free.remove(bound[0])
        elif same_shape:
            status[i], assigned[i] = WRONG_COLOUR, same_shape[0]
            free.remove(same_shape[0])
        else:
            status[i] = NEGLECTED
    return MatchResult(expected=expected, status=list(status), detection=assigned, extra=free)


def box_iou(a, b) -> float:
    """IoU of two boxes ``(x0, y0, x1, y1)``."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class ValidationReport:
    """Detector accuracy on ``n`` ground-truth renders.

    ``accuracy``: fraction of scenes whose detected (colour, shape) multiset equals the truth;
    ``object_accuracy``: fraction of objects found with the right colour and shape; ``mean_iou``: mean box IoU
    of those objects; ``confusion``: counts of (true shape, detected shape) among colour-matched objects.
    """

    n: int
    accuracy: float
    object_accuracy: float
    mean_iou: float
    confusion: dict
    failures: list[int]


def validate_detector(n: int = 1000, seed: int = 12345, size: int = 64, **detect_kwargs) -> ValidationReport:
    """Render ``n`` scenes from ``seed`` and score ``detect`` on them (see ``ValidationReport``)."""
    images, _, scenes = make_dataset(n, seed=seed, size=size)
    exact, found, total, ious = 0, 0, 0, []
    confusion: Counter = Counter()
    failures = []
    for i, (image, scene) in enumerate(zip(images, scenes)):
        dets = detect(image, **detect_kwargs)
        truth = Counter((o.colour, o.shape) for o in scene.objects)
        got = Counter((d.colour, d.shape) for d in dets)
        if truth == got:
            exact += 1
        else:
            failures.append(i)
        result = match(scene, dets)
        for obj, status, j in zip(scene.objects, result.status, result.detection):
            total += 1
            if status == PRESENT:
                found += 1
                ious.append(box_iou(obj.box, dets[j].box))
        for obj in scene.objects:
            same_colour = [d for d in dets if d.colour == obj.colour]
            best = max(same_colour, key=lambda d: box_iou(obj.box, d.box), default=None)
            confusion[(obj.shape, best.shape if best is not None else None)] += 1
    return ValidationReport(
        n=n, accuracy=exact / max(1, n), object_accuracy=found / max(1, total),
        mean_iou=float(np.mean(ious)) if ious else 0.0, confusion=dict(confusion), failures=failures,
    )
