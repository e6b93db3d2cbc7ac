"""``layout``: does each object land in the region it was given?

A case is a prompt plus one box per object. The suite fills the ``regions`` control's ``regions`` from the
case (the recipe's other options, mode, strength, window..., are kept), so one recipe is measured on every
layout; the baseline is the plain pipeline on the same prompts and seeds, which places objects where it likes.

Metrics per image, averaged over objects: ``inside_region`` (the object is detected with its colour and shape,
``attnctl.shapes.detect``, and its box centre lies inside its region; an undetected object counts as outside),
``mean_iou`` (IoU of the detected box with the region, 0 when undetected), and, to tell placement from
presence, ``detected`` (the object is there at all) and ``inside_if_detected`` (``inside_region`` over the
detected objects only; None when none is).

Built-in layouts: 40 two-object layouts (8 arrangements: left/right, right/left, top/bottom, bottom/top and
the four diagonals of quadrants, x 5 colour/shape pairs) and 8 one-object layouts (4 quadrants x 2 objects),
``--seeds`` each (default 8: 384 images per run). Prompts never name a position: the layout comes from the
regions alone.

``--prompts`` lines: ``PROMPT | PHRASE: x0,y0,x1,y1 | PHRASE: x0,y0,x1,y1 ...``, boxes as fractions of
width and height with the origin at the top left, e.g.::

    a red circle and a blue square | red circle: 0,0,0.5,1 | blue square: 0.5,0,1,1

Each phrase must name a shape (and a colour, or the prompt must name that shape once, in one colour).
"""

from __future__ import annotations

import numpy as np

from ..errors import AttnctlError
from ..shapes.data import COLOURS, SHAPES, parse_caption
from ..shapes.detect import detect
from ..shapes.validate import PRESENT, box_iou, match
from .base import Case, Suite

# Arrangements: one region per object, in the prompt's order. Boxes leave a margin: objects are 0.2-0.4 wide.
LEFT, RIGHT = (0.04, 0.2, 0.48, 0.8), (0.52, 0.2, 0.96, 0.8)
TOP, BOTTOM = (0.2, 0.04, 0.8, 0.48), (0.2, 0.52, 0.8, 0.96)
QUADRANTS = {"top-left": (0.04, 0.04, 0.48, 0.48), "top-right": (0.52, 0.04, 0.96, 0.48),
             "bottom-left": (0.04, 0.52, 0.48, 0.96), "bottom-right": (0.52, 0.52, 0.96, 0.96)}
ARRANGEMENTS: dict[str, tuple[tuple[float, ...], ...]] = {
    "left-right": (LEFT, RIGHT),
    "right-left": (RIGHT, LEFT),
    "top-bottom": (TOP, BOTTOM),
    "bottom-top": (BOTTOM, TOP),
    "diagonal-tl-br": (QUADRANTS["top-left"], QUADRANTS["bottom-right"]),
    "diagonal-br-tl": (QUADRANTS["bottom-right"], QUADRANTS["top-left"]),
    "diagonal-tr-bl": (QUADRANTS["top-right"], QUADRANTS["bottom-left"]),
    "diagonal-bl-tr": (QUADRANTS["bottom-left"], QUADRANTS["top-right"]),
}
PAIRS = [("red circle", "blue square"), ("green triangle", "yellow star"), ("purple square", "orange circle"),
         ("blue star", "red triangle"), ("yellow circle", "green square")]
SINGLES = ["red square", "blue circle"]


def built_in_layouts() -> list[tuple[str, list[tuple[str, tuple[float, ...]]]]]:
    """(prompt, [(phrase, box), ...]) for every built-in layout: 40 with two objects, 8 with one."""
    layouts = []
    for first, second in PAIRS:
        for boxes in ARRANGEMENTS.values():
            layouts.append((f"a {first} and a {second}", [(first, boxes[0]), (second, boxes[1])]))
    for phrase in SINGLES:
        for box in QUADRANTS.values():
            layouts.append((f"a {phrase}", [(phrase, box)]))
    return layouts


def _object_of(phrase: str, prompt: str, where: str) -> tuple[str, str]:
    """(colour, shape) named by a region phrase; the colour may come from the prompt."""
    words = phrase.lower().split()
    shape = next((w for w in words if w in SHAPES), None)
    if shape is None:
        raise AttnctlError(f"{where}: region phrase {phrase!r} names no shape; allowed shapes: {', '.join(SHAPES)}")
    colour = next((w for w in words if w in COLOURS), None)
    if colour is None:
        colours = {o["colour"] for o in parse_caption(prompt) if o["shape"] == shape}
        if len(colours) != 1:
            raise AttnctlError(f"{where}: region phrase {phrase!r} names no colour and the prompt names the "
                               f"{shape} in {len(colours)} colours; write the colour in the phrase")
        colour = colours.pop()
    return colour, shape


def parse_line(line: str, where: str = "line") -> tuple[str, list[tuple[str, tuple[float, ...]]]]:
    """``PROMPT | PHRASE: x0,y0,x1,y1 | ...`` -> (prompt, [(phrase, box), ...]); ``AttnctlError`` otherwise."""
    fmt = "write 'PROMPT | PHRASE: x0,y0,x1,y1 | PHRASE: x0,y0,x1,y1', e.g. " \
          "'a red circle and a blue square | red circle: 0,0,0.5,1 | blue square: 0.5,0,1,1'"
    parts = [p.strip() for p in line.split("|")]
    prompt, regions = parts[0], []
    if not prompt or len(parts) < 2:
        raise AttnctlError(f"{where}: {line!r}: a prompt and at least one region are needed; {fmt}")
    for part in parts[1:]:
        phrase, colon, numbers = part.rpartition(":")
        try:
            box = tuple(float(v) for v in numbers.split(","))
        except ValueError:
            box = ()
        if not colon or not phrase.strip() or len(box) != 4:
            raise AttnctlError(f"{where}: region {part!r}: {fmt}")
        if not all(0 <= v <= 1 for v in box) or not (box[0] < box[2] and box[1] < box[3]):
            raise AttnctlError(f"{where}: region {part!r}: box values must be in [0, 1] with x0 < x1 and y0 < y1")
        regions.append((phrase.strip(), box))
    return prompt, regions


class LayoutSuite(Suite):
    name = "layout"
    description = "objects inside their regions (regions control), IoU with the region"
    metrics = {"inside_region": True, "mean_iou": True, "detected": True, "inside_if_detected": True}
    default_seeds = 8
    line_format = "PROMPT | PHRASE: x0,y0,x1,y1 | ..., e.g. 'a red circle and a blue square | red circle: 0,0,0.5,1 " \
                  "| blue square: 0.5,0,1,1'"

    def cases(self, lines, seeds):
        if lines:
            layouts = [parse_line(line, f"--prompts line {i + 1}") for i, line in enumerate(lines)]
        else:
            layouts = built_in_layouts()
        cases = []
        for index, (prompt, regions) in enumerate(layouts):
            objects = [_object_of(p, prompt, f"layout {index + 1}") for p, _ in regions]
            info = {"regions": [{"phrase": p, "box": list(b), "object": list(o)} for (p, b), o in zip(regions, objects)]}
            cases += [Case(prompt, seed, info) for seed in range(seeds)]
        return cases

    def fill(self, name, options, case):
        if name == "regions":
            options["regions"] = [{"phrase": r["phrase"], "box": r["box"]} for r in case.info["regions"]]
        return options

    def score(self, case, output):
        regions = case.info["regions"]
        detections = detect(output)
        result = match([tuple(r["object"]) for r in regions], detections)
        inside, ious, found, per_object = [], [], [], []
        for region, status, index in zip(regions, result.status, result.detection):
            box = region["box"]
            if status == PRESENT and index is not None:
                d = detections[index].box
                cx, cy = (d[0] + d[2]) / 2, (d[1] + d[3]) / 2
                hit = box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
                iou = box_iou(box, d)
                per_object.append({"phrase": region["phrase"], "box": [round(v, 3) for v in d], "inside": hit,
                                   "iou": round(iou, 4)})
            else:
                hit, iou = False, 0.0
                per_object.append({"phrase": region["phrase"], "status": status})
            inside.append(float(hit))
            ious.append(iou)
            found.append(float(status == PRESENT))
        detected_inside = [h for h, f in zip(inside, found) if f]
        return {"inside_region": float(np.mean(inside)), "mean_iou": float(np.mean(ious)),
                "detected": float(np.mean(found)),
                "inside_if_detected": float(np.mean(detected_inside)) if detected_inside else None,
                "objects": per_object}


SUITE = LayoutSuite()

__all__ = ["ARRANGEMENTS", "SUITE", "built_in_layouts", "parse_line"]
