"""``quality``: single-object prompts read right by the detector, and unconditional samples that hold an object.

Metrics: ``object_accuracy`` (the detected objects include the caption's colour and shape), ``shape_score``
(``attnctl.shapes.graded``: how closely the object drawn in the named colour matches the named shape, 0..1, so
that a sharper or cleaner shape scores higher even where the detector's verdict does not change: what perturbed
guidance is meant to improve), ``uncond_valid`` (an empty-prompt sample with at least one detected object). Built-in prompts: the 24 colour/shape pairs
("a red circle"), each with ``--seeds`` seeds (default 9: 216 images), plus ``3 x seeds`` unconditional samples.
A ``--prompts`` file gives one single-object caption per line.
"""

from __future__ import annotations

from ..shapes.benchmark import prompt_set
from ..shapes.detect import detect
from ..shapes.graded import object_score
from ..shapes.validate import expected_objects
from ..shapes.validate import match
from .base import Case, Suite, seeded_cases


class QualitySuite(Suite):
    name = "quality"
    description = "single-object accuracy and valid unconditional samples"
    metrics = {"object_accuracy": True, "shape_score": True, "uncond_valid": True}
    default_seeds = 9
    line_format = "one single-object caption per line, e.g. 'a red circle'"

    def cases(self, lines, seeds):
        prompts = lines or prompt_set("single", 24)
        uncond = [Case("", 10_000 + s, {"unconditional": True}) for s in range(3 * seeds)]
        return seeded_cases(prompts, seeds) + uncond

    def score(self, case, output):
        dets = detect(output)
        found = [[d.colour, d.shape] for d in dets]
        if case.info.get("unconditional"):
            return {"object_accuracy": None, "shape_score": None, "uncond_valid": float(bool(dets)),
                    "detections": found}
        expected = expected_objects(case.prompt)
        graded = sum(object_score(dets, c, s) for c, s in expected) / len(expected) if expected else 0.0
        return {"object_accuracy": float(match(case.prompt, dets).all_present), "shape_score": float(graded),
                "uncond_valid": None, "detections": found}


SUITE = QualitySuite()
