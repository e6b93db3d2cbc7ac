"""``presence``: multi-object prompts; is every named object drawn, with its own colour?

Metrics: ``all_present`` (every object detected with its colour and shape), ``neglect_rate`` (some object's
shape missing altogether), ``binding_errors`` (a shape present in another named object's colour). Built-in
prompts: 32 two-object and 12 three-object captions with distinct shapes, ``--seeds`` each (default 8: 352
images). For controls that need subjects, the suite fills them in from the caption: Attend-and-Excite's
``subjects`` become the caption's shape nouns when the recipe leaves them out (or writes ``auto``).
"""

from __future__ import annotations

import numpy as np

from ..shapes.benchmark import prompt_set
from ..shapes.data import COLOURS, SHAPES, parse_caption
from ..shapes.detect import detect
from ..shapes.validate import match
from .base import Suite, seeded_cases


def crowds(n: int, k: int, seed: int) -> list[str]:
    """``n`` captions of ``k`` objects (3 or 4) with distinct colours and distinct shapes, listed with commas
    ("a red circle, a blue square and a green star")."""
    rng = np.random.default_rng(seed)
    colours, shapes = list(COLOURS), list(SHAPES)
    out = []
    for _ in range(n):
        cs = rng.choice(len(colours), k, replace=False)
        ss = rng.choice(len(shapes), k, replace=False)
        parts = [f"a {colours[i]} {shapes[j]}" for i, j in zip(cs, ss)]
        out.append(", ".join(parts[:-1]) + " and " + parts[-1])
    return out


def triples(n: int, seed: int = 1) -> list[str]:
    """``n`` three-object captions: distinct colours and distinct shapes ("a red circle, a blue square and ...")."""
    return crowds(n, 3, seed)


def subjects_of(caption: str) -> list[str]:
    """The shape nouns of ``caption`` in order, a repeated noun written ``noun#n`` (the n-th occurrence)."""
    seen: dict[str, int] = {}
    out = []
    for obj in parse_caption(caption):
        seen[obj["shape"]] = seen.get(obj["shape"], 0) + 1
        out.append(obj["shape"] if seen[obj["shape"]] == 1 else f"{obj['shape']}#{seen[obj['shape']]}")
    return out


class PresenceSuite(Suite):
    name = "presence"
    description = "every named object present, neglect and binding errors"
    metrics = {"all_present": True, "neglect_rate": False, "binding_errors": False}
    default_seeds = 8
    line_format = "one multi-object caption per line, e.g. 'a red circle and a blue square'"

    def cases(self, lines, seeds):
        prompts = lines or (prompt_set("pair", 32, seed=7) + triples(12))
        return seeded_cases(prompts, seeds)

    def fill(self, name, options, case):
        if name == "excite" and options.get("subjects") in (None, "auto", ["auto"]):
            options["subjects"] = subjects_of(case.prompt)
        return options

    def score(self, case, output):
        dets = detect(output)
        result = match(case.prompt, dets)
        return {"all_present": float(result.all_present), "neglect_rate": float(result.neglect),
                "binding_errors": float(result.binding_error), "status": result.status,
                "detections": [[d.colour, d.shape] for d in dets]}


class CrowdedSuite(PresenceSuite):
    """``crowded``: three- and four-object prompts, where subjects compete for attention and a model most often
    neglects one (Attend-and-Excite's case). Built-in: 16 three-object and 16 four-object captions (seeded apart
    from ``presence``'s), ``--seeds`` each (default 10: 320 images)."""

    name = "crowded"
    description = "three- and four-object prompts: every object present, neglect and binding errors"
    default_seeds = 10

    def cases(self, lines, seeds):
        return seeded_cases(lines or (crowds(16, 3, seed=11) + crowds(16, 4, seed=12)), seeds)


SUITE = PresenceSuite()
CROWDED = CrowdedSuite()

__all__ = ["CROWDED", "SUITE", "crowds", "subjects_of", "triples"]
