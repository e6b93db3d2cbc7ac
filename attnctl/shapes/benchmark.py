"""Scoring a text-to-image pipeline on ShapesWorld prompts with the rule-based detector.

``prompt_set("single" | "pair", n, seed)`` builds prompts; ``score_pipeline(pipe, prompts, ...)`` generates one
image per prompt (seed ``seed + i`` for prompt ``i``) and reports the fraction of images in which every named
object is present, plus neglect and binding-error rates. Used for the embedded models' cards and by the
evaluation suites.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import COLOURS, SHAPES, ShapesError
from .detect import detect
from .validate import match

PROMPT_KINDS = ("single", "pair")


def prompt_set(kind: str, n: int, seed: int = 0) -> list[str]:
    """``n`` prompts: ``single`` cycles through every colour/shape pair in a seeded order; ``pair`` draws two
    objects with different colours and different shapes ("a red circle and a blue square")."""
    rng = np.random.default_rng(seed)
    if kind == "single":
        combos = [f"a {c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]
        order = rng.permutation(len(combos))
        return [combos[order[i % len(combos)]] for i in range(n)]
    if kind == "pair":
        out = []
        colours, shapes = list(COLOURS), list(SHAPES)
        for _ in range(n):
            c1, c2 = rng.choice(len(colours), 2, replace=False)
            s1, s2 = rng.choice(len(shapes), 2, replace=False)
            out.append(f"a {colours[c1]} {shapes[s1]} and a {colours[c2]} {shapes[s2]}")
        return out
    raise ShapesError(f"unknown prompt kind {kind!r}; allowed: {', '.join(PROMPT_KINDS)}")


@dataclass
class ScoreReport:
    """``all_present``: fraction of images with every named object (colour+shape); ``object_recall``: fraction
    of named objects found; ``neglect``: fraction of images missing an object's shape entirely;
    ``binding_error``: fraction with a shape in another named object's colour."""

    n: int
    all_present: float
    object_recall: float
    neglect: float
    binding_error: float
    per_image: list[dict] = field(default_factory=list)


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 25, guidance_scale: float = 4.5,
             batch_size: int = 25, size: int = 64, **call_kwargs) -> np.ndarray:
    """Images ``uint8 (N, size, size, 3)``, prompt ``i`` generated from ``torch.Generator().manual_seed(seed + i)``."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + k) for k in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size,
                   generator=gens, output_type="np", **call_kwargs).images
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)


def score_images(images, prompts: list[str]) -> ScoreReport:
    """Score ``images: (N, H, W, 3)`` against their ``prompts`` with the detector."""
    rows, present, found, total, neglect, binding = [], 0, 0, 0, 0, 0
    for image, prompt in zip(images, prompts):
        dets = detect(image)
        result = match(prompt, dets)
        present += result.all_present
        found += result.n_present
        total += len(result.expected)
        neglect += result.neglect
        binding += result.binding_error
        rows.append({"prompt": prompt, "status": result.status,
                     "detections": [(d.colour, d.shape) for d in dets]})
    n = max(1, len(prompts))
    return ScoreReport(n=len(prompts), all_present=present / n, object_recall=found / max(1, total),
                       neglect=neglect / n, binding_error=binding / n, per_image=rows)


def score_pipeline(pipe, prompts: list[str], seed: int = 0, **generate_kwargs) -> tuple[ScoreReport, np.ndarray]:
    """Generate one image per prompt and score it; returns the report and the images."""
    images = generate(pipe, prompts, seed=seed, **generate_kwargs)
    return score_images(images, prompts), images
