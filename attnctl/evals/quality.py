"""``quality``: single-object prompts read right by the detector, and unconditional samples that hold an object.

Metrics: ``object_accuracy`` (the detected objects include the caption's colour and shape), ``uncond_valid``
(an empty-prompt sample with at least one detected object). Built-in prompts: the 24 colour/shape pairs
("a red circle"), each with ``--seeds`` seeds (default 9: 216 images), plus ``3 x seeds`` unconditional samples.
A ``--prompts`` file gives one single-object caption per line.
"""

from __future__ import annotations

from ..shapes.benchmark import prompt_set
from ..shapes.detect import detect
from ..shapes.validate import match
from .base import Case, Suite, seeded_cases


class QualitySuite(Suite):
    name = "quality"
    description = "single-object accuracy and valid unconditional samples"
    metrics = {"object_accuracy": True, "uncond_valid": True}
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
            return {"object_accuracy": None, "uncond_valid": float(bool(dets)), "detections": found}
        return {"object_accuracy": float(match(case.prompt, dets).all_present), "uncond_valid": None,
                "detections": found}


SUITE = QualitySuite()
