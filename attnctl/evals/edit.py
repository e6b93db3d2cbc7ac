"""``edit``: prompt-based edits of single ShapesWorld objects (colour swaps, shape swaps).

Each case is ``source -> target`` with a seed. Controlled: one pipeline call holds (source, target) row pairs
from the same seed, coupled by the recipe's ``edit`` control (``pairs: pairs`` is set, and the recipe's
blend words are dropped: each pair's changed words make its blend mask). Baseline: the source and the target
prompt generated from the same seed with no control ("just regenerate with the new prompt"). Metrics, from
the detector:

- ``edit_success``: the target image shows the target's colour and shape;
- ``box_iou``: on success, IoU of the edited object's box with the source object's box (preservation);
- ``background_psnr``: PSNR between source and target outside both objects' boxes (dilated by 2 px).

Built-in cases: for each of the 24 colour/shape objects, one colour swap and one shape swap (48 edits), x
``--seeds`` (default 4): 192 rows. ``--prompts`` lines read ``a red circle -> a blue circle``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import AttnctlError
from ..inversion import psnr
from ..shapes.data import COLOURS, SHAPES, parse_caption
from ..shapes.detect import detect
from .base import Case, Suite


def builtin_edits() -> list[tuple[str, str]]:
    colours, shapes = list(COLOURS), list(SHAPES)
    out = []
    for i, colour in enumerate(colours):
        for j, shape in enumerate(shapes):
            source = f"a {colour} {shape}"
            # offsets 1..5 and 1..3: never the source's own colour or shape
            out.append((source, f"a {colours[(i + 1 + j % (len(colours) - 1)) % len(colours)]} {shape}"))
            out.append((source, f"a {colour} {shapes[(j + 1 + i % (len(shapes) - 1)) % len(shapes)]}"))
    return out


def _parse(line: str) -> tuple[str, str]:
    if "->" not in line:
        raise AttnctlError(f"edit suite: write each line as 'source -> target', got {line!r}")
    source, target = (part.strip() for part in line.split("->", 1))
    for prompt in (source, target):
        objects = parse_caption(prompt)
        if len(objects) != 1:
            raise AttnctlError(f"edit suite: {prompt!r} must name exactly one object (colour and shape)")
    return source, target


def _box_iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _find(detections, colour: str, shape: str):
    exact = [d for d in detections if d.colour == colour and d.shape == shape]
    pool = exact or detections
    return (max(pool, key=lambda d: d.pixels), bool(exact)) if pool else (None, False)


class EditSuite(Suite):
    name = "edit"
    description = "colour and shape swaps: edit success, box IoU with the source, background PSNR"
    metrics = {"edit_success": True, "box_iou": True, "background_psnr": True}
    default_seeds = 4
    line_format = "one edit per line: 'a red circle -> a blue circle'"

    def cases(self, lines, seeds):
        edits = [_parse(line) for line in lines] if lines else builtin_edits()
        cases = []
        for source, target in edits:
            (s,), (t,) = parse_caption(source), parse_caption(target)
            kind = "colour" if s["shape"] == t["shape"] else "shape" if s["colour"] == t["colour"] else "both"
            info = {"source": source, "target": target, "kind": kind, "source_object": [s["colour"], s["shape"]],
                    "target_object": [t["colour"], t["shape"]]}
            cases += [Case(target, seed, dict(info)) for seed in range(seeds)]
        return cases

    def fill(self, name, options, case):
        if name != "edit":
            return options
        options = dict(options)
        options.pop("target", None)
        options.pop("image", None)
        options["pairs"] = "pairs"
        blend = options.get("blend")
        if blend is not None and blend.get("mask") is None:
            # The recipe's blend words name its own edit; here each pair's changed words make the mask
            # (the control's default), which keeps the options equal across cases so they batch.
            options["blend"] = {k: v for k, v in blend.items() if k != "words"}
        return options

    def generate(self, pipe, settings, cases, controls):
        from ..engine import apply

        prompts, gens = [], []
        for c in cases:
            prompts += [c.info["source"], c.info["target"]]
            gens += [torch.Generator("cpu").manual_seed(c.seed) for _ in range(2)]
        kwargs = settings.call_kwargs()
        if controls:
            with apply(pipe, controls):
                images = pipe(prompt=prompts, generator=gens, **kwargs).images
        else:
            images = pipe(prompt=prompts, generator=gens, **kwargs).images
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        return [(images[2 * i], images[2 * i + 1]) for i in range(len(cases))]

    def score(self, case, output):
        source, target = output
        det_s, det_t = detect(source), detect(target)
        obj_s, source_ok = _find(det_s, *case.info["source_object"])
        obj_t, success = _find(det_t, *case.info["target_object"])
        h, w = source.shape[:2]
        keep = np.ones((h, w), bool)
        for obj in (obj_s, obj_t):
            if obj is not None:
                x0, y0, x1, y1 = obj.box
                keep[max(0, int(y0 * h) - 2): int(np.ceil(y1 * h)) + 2, max(0, int(x0 * w) - 2): int(np.ceil(x1 * w)) + 2] = False
        background = psnr(source, target, keep) if keep.any() else None
        if background is not None and not np.isfinite(background):
            background = 60.0  # identical backgrounds: cap (PSNR of 8-bit images rarely exceeds 50 dB)
        iou = _box_iou(obj_s.box, obj_t.box) if (success and obj_s is not None) else None
        return {"edit_success": float(success), "box_iou": iou, "background_psnr": background,
                "source_ok": source_ok, "target_detections": [[d.colour, d.shape] for d in det_t]}

    def extra(self):
        return {"baseline_is": "the target prompt regenerated from the same seed (no control)",
                "background": "PSNR outside both objects' boxes dilated by 2 px; identical backgrounds capped at 60 dB"}


SUITE = EditSuite()

__all__ = ["SUITE", "builtin_edits"]
