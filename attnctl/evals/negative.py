"""``negative``: does a negative prompt keep a concept out of the image, and what does it cost the prompt?

Made for the ``nag`` control (Normalized Attention Guidance), which works without CFG: by default the suite runs
at guidance 1 (no CFG, one denoiser row per image) with NAG's own defaults (``nag: {negative_prompt: auto}``);
a ``--recipe`` overrides either (its ``guidance_scale``, its ``controls``; a recipe without ``guidance_scale``
still runs at 1).

A case is a positive prompt, a negative concept and a seed. The concept is one colour (red, green, blue,
yellow, purple, orange) or one shape (circle, square, triangle, star) that the prompt leaves open: the prompt
never names it, yet the model draws it unasked in about half of the baseline images (an empty prompt's
samples, or a two- or three-object prompt's objects drawn in a confusable colour or shape). The suite writes the concept
into the control: ``negative_prompt: auto`` becomes the concept word ("blue"); a text holding ``{concept}`` is a
template (``"a {concept}"``); any other text is an error, since the suite sets each case's negative.

Metrics per image, from the ShapesBench detector (``attnctl.shapes.detect``, default settings):

- ``shows_negative`` (lower is better): 1 when some detected object has the negative colour (a colour
  concept: any shape in that colour) or the negative shape (a shape concept: that shape in any colour), else 0;
- ``positive_accuracy`` (higher is better): for a prompt that names objects, 1 when every named object is
  detected with its colour and shape (``attnctl.shapes.validate.match``, ``all_present``); for the empty
  prompt, 1 when at least one object is detected (a valid sample);
- ``positive_recall`` (higher is better): the fraction of the named objects so detected (the empty prompt: as
  ``positive_accuracy``); it tells a partial loss from none where the models rarely draw every named object
  without CFG (``shapes-dit`` at guidance 1 drew every object of a two- or three-object prompt in 0-12% of
  the calibration images).

Each is averaged over rows; ``delta_ci95`` holds the paired bootstrap 95% interval of controlled - baseline
(the same prompts and seeds), and the report adds ``relative_cut`` (``1 - controlled / baseline`` share of
images showing the negative, with its paired bootstrap interval), ``per_case`` (each prompt and negative: its
shares and accuracies), ``by_kind`` (colour and shape concepts, empty and object prompts) and ``targets``
(issue 22's goal: a relative cut of at least 0.5 with a positive-accuracy change of at least -0.05).

Built-in cases are per model (``CASES``), chosen by ``calibrate`` on seeds 50000-50015 (``CALIBRATION_SEED_START``,
``CALIBRATION_SEEDS``), which evaluation seeds stay below (seeds 0 up, or ``--seed-start 1000`` up): every
candidate prompt's baseline at guidance 1, and the concepts it leaves open that appear in 35-65% of its images
(``SELECT``). The calibration command (baseline only, no control)::

    python -m attnctl.evals.negative --model shapes --json benchmarks/negative-calibration-shapes.json

The default ``--seeds`` gives every case enough seeds for at least 320 rows. ``--prompts`` lines read
``PROMPT | NEGATIVE`` ("a red circle and a blue square | star"; "| circle" for the empty prompt).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import AttnctlError
from ..shapes.benchmark import prompt_set
from ..shapes.data import COLOURS, SHAPES, parse_caption
from ..shapes.detect import detect
from ..shapes.validate import match
from .base import Case, Settings, Suite, paired_bootstrap, paired_bootstrap_relative_cut, summarise
from .presence import crowds

CONCEPTS: tuple[str, ...] = tuple(COLOURS) + tuple(SHAPES)
MIN_ROWS = 320  # the default --seeds gives at least this many rows
TARGET_CUT = 0.5  # relative cut of the share of images showing the negative
TARGET_ACCURACY_DROP = 0.05  # most the positive prompt's accuracy may fall

# Calibration: candidate prompts, seeds apart from every evaluation seed, and the share that counts as "about half".
CALIBRATION_SEED_START = 50_000
CALIBRATION_SEEDS = 16
CALIBRATION_PROMPTS: tuple[str, ...] = ("",) + tuple(prompt_set("pair", 8, seed=22)) + tuple(crowds(3, 3, seed=23))
SELECT = (0.35, 0.65)

# The chosen cases, (prompt, negative concept), from ``calibrate`` on each model (see the module docstring).
CASES: dict[str, tuple[tuple[str, str], ...]] = {
    # python -m attnctl.evals.negative --model shapes (benchmarks/negative-calibration-shapes.json); share in ()
    "shapes": (
        ("", "yellow"),  # 0.56
        ("", "circle"),  # 0.50
        ("", "square"),  # 0.38
        ("", "triangle"),  # 0.56
        ("", "star"),  # 0.50
        ("a orange circle and a green triangle", "star"),  # 0.38
        ("a yellow triangle and a green square", "circle"),  # 0.44
        ("a green square and a blue circle", "star"),  # 0.44
        ("a purple triangle and a blue square", "circle"),  # 0.62
        ("a purple triangle, a orange circle and a blue star", "red"),  # 0.38
    ),
    # python -m attnctl.evals.negative --model shapes-dit (benchmarks/negative-calibration-shapes-dit.json), on
    # shapes-dit version 2 (2026-12-03; version 1's list was recalibrated when the model changed)
    "shapes-dit": (
        ("", "green"),  # 0.44
        ("", "blue"),  # 0.56
        ("", "circle"),  # 0.38
        ("a yellow square and a green circle", "star"),  # 0.50
        ("a orange circle and a green triangle", "yellow"),  # 0.38
        ("a yellow triangle and a green square", "circle"),  # 0.62
        ("a yellow triangle and a green square", "star"),  # 0.62
        ("a purple triangle and a blue square", "circle"),  # 0.62
        ("a purple triangle and a blue square", "star"),  # 0.44
        ("a blue circle and a orange triangle", "star"),  # 0.50
        ("a blue star, a red square and a yellow circle", "purple"),  # 0.38
        ("a blue star, a red square and a yellow circle", "orange"),  # 0.44
        ("a blue star, a red square and a yellow circle", "triangle"),  # 0.56
        ("a purple triangle, a orange circle and a blue star", "red"),  # 0.44
    ),
}


def concept_kind(concept: str) -> str:
    """``colour`` or ``shape``; ``AttnctlError`` naming the allowed words otherwise."""
    if concept in COLOURS:
        return "colour"
    if concept in SHAPES:
        return "shape"
    raise AttnctlError(f"negative concept {concept!r} is not a ShapesWorld colour or shape; allowed: "
                       f"{', '.join(CONCEPTS)}")


def shows(detections, concept: str) -> bool:
    """Whether some detection shows ``concept``: its colour (a colour concept) or its shape (a shape concept)."""
    kind = concept_kind(concept)
    return any((d.colour if kind == "colour" else d.shape) == concept for d in detections)


def named_concepts(prompt: str) -> set[str]:
    """Colours and shapes a prompt names (none for the empty prompt)."""
    if not prompt.strip():
        return set()
    return {value for obj in parse_caption(prompt) for value in (obj["colour"], obj["shape"])}


def positive_accuracy(prompt: str, detections) -> float:
    """1.0 when every object ``prompt`` names is detected with its colour and shape (the empty prompt: when any
    object is detected), else 0.0."""
    if not prompt.strip():
        return float(bool(detections))
    return float(match(prompt, detections).all_present)


def positive_recall(prompt: str, detections) -> float:
    """Fraction of the objects ``prompt`` names that are detected with their colour and shape (the empty prompt:
    ``positive_accuracy``)."""
    if not prompt.strip():
        return float(bool(detections))
    result = match(prompt, detections)
    return result.n_present / len(result.expected)


def check_case(prompt: str, negative: str, where: str) -> None:
    """A case's prompt must parse (or be empty) and leave its negative concept open."""
    concept_kind(negative)
    try:
        named = named_concepts(prompt)
    except AttnctlError as exc:
        raise AttnctlError(f"{where}: prompt {prompt!r}: {exc}") from None
    if negative in named:
        raise AttnctlError(f"{where}: prompt {prompt!r} names the negative concept {negative!r}; the suite measures "
                           "concepts the prompt leaves open (name another colour or shape)")


def parse_line(line: str, where: str = "line") -> tuple[str, str]:
    """``PROMPT | NEGATIVE`` -> (prompt, negative); the prompt may be empty (``| circle``)."""
    prompt, bar, negative = line.partition("|")
    negative = negative.strip().lower()
    if not bar or not negative or " " in negative or "|" in negative:
        raise AttnctlError(f"{where}: {line!r}: write 'PROMPT | NEGATIVE' with one colour or shape word as the "
                           f"negative, e.g. 'a red circle and a blue square | star' ('| circle' for the empty "
                           f"prompt); allowed negatives: {', '.join(CONCEPTS)}")
    prompt = prompt.strip()
    check_case(prompt, negative, where)
    return prompt, negative


def model_key(model: str) -> str:
    """The built-in case list a model string uses: ``shapes``, ``shapes-dit``, or a folder of that name."""
    return Path(str(model).rstrip("/")).name


class NegativeSuite(Suite):
    name = "negative"
    description = "negative concept kept out (share of images showing it) and the positive prompt's accuracy"
    metrics = {"shows_negative": False, "positive_accuracy": True, "positive_recall": True}
    default_seeds = 16
    line_format = "PROMPT | NEGATIVE, e.g. 'a red circle and a blue square | star' ('| circle': empty prompt)"
    settings_defaults = {"guidance_scale": 1.0, "controls": {"nag": {"negative_prompt": "auto"}}}

    def cases(self, lines, seeds):
        return self.cases_for(lines, seeds, "shapes")

    def cases_for(self, lines, seeds, model):
        if lines:
            pairs = [parse_line(line, f"--prompts line {i + 1}") for i, line in enumerate(lines)]
        else:
            key = model_key(model)
            if not CASES.get(key):
                raise AttnctlError(f"eval negative: no built-in cases for model {model!r} (built in: "
                                   f"{', '.join(k for k, v in CASES.items() if v)}); give --prompts with "
                                   "'PROMPT | NEGATIVE' lines, chosen with python -m attnctl.evals.negative")
            pairs = list(CASES[key])
        seeds = seeds or math.ceil(MIN_ROWS / len(pairs))
        cases = []
        for prompt, negative in pairs:
            info = {"negative": negative, "kind": concept_kind(negative),
                    "prompt_kind": "empty" if not prompt else "objects"}
            cases += [Case(prompt, seed, dict(info)) for seed in range(seeds)]
        return cases

    def fill(self, name, options, case):
        if name == "nag":
            given = options.get("negative_prompt", "auto")
            if given in (None, "auto"):
                options["negative_prompt"] = case.info["negative"]
            elif isinstance(given, str) and "{concept}" in given:
                options["negative_prompt"] = given.replace("{concept}", case.info["negative"])
            else:
                raise AttnctlError(f"eval negative: controls.nag.negative_prompt = {given!r}: the suite sets each "
                                   "case's negative concept; allowed: 'auto' (the concept word, e.g. 'blue') or a "
                                   "text holding {concept}, e.g. 'a {concept}'")
        return options

    def score(self, case, output):
        dets = detect(output)
        return {"shows_negative": float(shows(dets, case.info["negative"])),
                "positive_accuracy": positive_accuracy(case.prompt, dets),
                "positive_recall": positive_recall(case.prompt, dets),
                "detections": [[d.colour, d.shape] for d in dets]}

    def summary(self, rows, controlled):
        keys = ("baseline", "controlled") if controlled else ("baseline",)
        groups: dict[tuple, list[dict]] = defaultdict(list)
        kinds: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            info = row.get("info", {})
            groups[(row["prompt"], info.get("negative"))].append(row)
            kinds[f"{info.get('kind')} concept"].append(row)
            kinds[f"{info.get('prompt_kind')} prompt"].append(row)
        per_case = [{"prompt": prompt, "negative": negative, "n": len(group),
                     **{key: summarise(self.metrics, group, key) for key in keys}}
                    for (prompt, negative), group in groups.items()]
        by_kind = {kind: {"n": len(group), **{key: summarise(self.metrics, group, key) for key in keys}}
                   for kind, group in sorted(kinds.items())}
        out = {"per_case": per_case, "by_kind": by_kind}
        if controlled:
            base = [r["baseline"]["shows_negative"] for r in rows]
            ctrl = [r["controlled"]["shows_negative"] for r in rows]
            mean_base, mean_ctrl = float(np.mean(base)), float(np.mean(ctrl))
            cut = 1.0 - mean_ctrl / mean_base if mean_base > 0 else None
            cut_ci = [None if math.isnan(v) else v for v in paired_bootstrap_relative_cut(base, ctrl)]
            acc_b = [r["baseline"]["positive_accuracy"] for r in rows]
            acc_c = [r["controlled"]["positive_accuracy"] for r in rows]
            acc_delta = float(np.mean(acc_c) - np.mean(acc_b))
            acc_ci = paired_bootstrap(acc_b, acc_c)
            out["relative_cut"] = {"value": cut, "ci95": cut_ci}
            out["targets"] = {
                "relative_cut": {"goal": f">= {TARGET_CUT}", "value": cut, "ci95": cut_ci,
                                 "met": cut is not None and cut >= TARGET_CUT,
                                 "met_at_ci_low": cut_ci[0] is not None and cut_ci[0] >= TARGET_CUT},
                "positive_accuracy_delta": {"goal": f">= -{TARGET_ACCURACY_DROP}", "value": acc_delta, "ci95": acc_ci,
                                            "met": acc_delta >= -TARGET_ACCURACY_DROP,
                                            "met_at_ci_low": bool(acc_ci[0] >= -TARGET_ACCURACY_DROP)},
            }
        return out

    def summary_lines(self, report):
        lines = []
        controlled = report.get("controlled") is not None

        def share(values, metric):
            value = values.get(metric) if values else None
            return "-" if value is None else f"{value:.3f}"

        lines.append("per case: shows negative baseline -> controlled | positive accuracy baseline -> controlled")
        for case in report.get("per_case", []):
            text = f"  {case['prompt'] or '(empty)'!s:52} not {case['negative']:8} n={case['n']:4d}  " \
                   f"{share(case['baseline'], 'shows_negative')}"
            if controlled:
                text += f" -> {share(case['controlled'], 'shows_negative')}"
            text += f" | {share(case['baseline'], 'positive_accuracy')}"
            if controlled:
                text += f" -> {share(case['controlled'], 'positive_accuracy')}"
            lines.append(text)
        for name, target in report.get("targets", {}).items():
            value = target["value"]
            low, high = ("-" if v is None else f"{v:+.3f}" for v in target["ci95"])
            lines.append(f"{name}: {'-' if value is None else f'{value:+.3f}'} [{low}, {high}] (goal {target['goal']}: "
                         f"{'met' if target['met'] else 'missed'}; at the interval's low end: "
                         f"{'met' if target['met_at_ci_low'] else 'missed'})")
        return lines


SUITE = NegativeSuite()


def calibrate(model: str = "shapes", seeds: int = CALIBRATION_SEEDS, seed_start: int = CALIBRATION_SEED_START,
              prompts=CALIBRATION_PROMPTS, steps: int = 25, batch_size: int = 32, json_path: str | None = None,
              pipe=None, progress: bool = True) -> dict:
    """Baseline only (no control, guidance 1): for every candidate prompt, the share of its images showing each
    colour and shape, and its positive accuracy; ``candidates`` are the (prompt, concept) pairs the prompt leaves
    open with a share inside ``SELECT``. Seeds ``seed_start .. seed_start + seeds - 1`` per prompt."""
    from tqdm.auto import tqdm

    from ..models import load

    if seeds < 1:
        raise AttnctlError(f"calibrate: seeds = {seeds}: give 1 or more")
    if seed_start < 0:
        raise AttnctlError(f"calibrate: seed_start = {seed_start}: seeds start at 0 or above")
    for prompt in prompts:
        named_concepts(prompt)  # every prompt parses
    settings = Settings.from_recipe(None, model, {"guidance_scale": 1.0})
    settings.steps = steps
    if pipe is None:
        pipe = load(settings.model, device=settings.device, dtype=settings.dtype)
    pipe.set_progress_bar_config(disable=True)
    cases = [Case(p, seed_start + s) for p in prompts for s in range(seeds)]
    detections = []
    for start in tqdm(range(0, len(cases), batch_size), desc="calibrate negative", disable=not progress):
        chunk = cases[start:start + batch_size]
        for image in SUITE.generate(pipe, settings, chunk, None):
            detections.append(detect(image))
    per_prompt, candidates = [], []
    for index, prompt in enumerate(prompts):
        dets = detections[index * seeds:(index + 1) * seeds]
        named = named_concepts(prompt)
        shares = {c: float(np.mean([shows(d, c) for d in dets])) for c in CONCEPTS}
        accuracy = float(np.mean([positive_accuracy(prompt, d) for d in dets]))
        per_prompt.append({"prompt": prompt, "positive_accuracy": accuracy, "shares": shares,
                           "objects_per_image": float(np.mean([len(d) for d in dets]))})
        for concept, value in shares.items():
            if concept not in named and SELECT[0] <= value <= SELECT[1]:
                candidates.append({"prompt": prompt, "negative": concept, "share": value})
    report = {"model": settings.model, "guidance_scale": settings.guidance_scale, "steps": steps,
              "seeds": [seed_start, seed_start + seeds - 1], "select": list(SELECT), "prompts": per_prompt,
              "candidates": candidates}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnctl.evals.negative",
                                     description="Calibrate the negative suite's cases: baseline shares of every "
                                                 "colour and shape per candidate prompt, at guidance 1.")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--seeds", type=int, default=CALIBRATION_SEEDS)
    parser.add_argument("--seed-start", type=int, default=CALIBRATION_SEED_START)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    report = calibrate(args.model, args.seeds, args.seed_start, steps=args.steps, json_path=args.json_path)
    for row in report["prompts"]:
        shares = " ".join(f"{c}={v:.2f}" for c, v in row["shares"].items() if v > 0)
        print(f"{row['prompt'] or '(empty)':60} acc={row['positive_accuracy']:.2f}  {shares}")
    print("candidates (open concept, share in "
          f"[{SELECT[0]}, {SELECT[1]}]):")
    for c in report["candidates"]:
        print(f"  ({c['prompt']!r}, {c['negative']!r}),  # {c['share']:.2f}")
    return 0


__all__ = ["CASES", "CONCEPTS", "SUITE", "calibrate", "concept_kind", "parse_line", "positive_accuracy",
           "positive_recall", "shows"]

if __name__ == "__main__":
    raise SystemExit(main())
