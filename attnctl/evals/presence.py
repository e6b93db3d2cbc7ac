"""``presence``: multi-object prompts; is every named object drawn, with its own colour?

Metrics: ``all_present`` (every object detected with its colour and shape), ``neglect_rate`` (some object's
shape missing altogether), ``binding_errors`` (a shape present in another named object's colour). Built-in
prompts: 32 two-object and 12 three-object captions with distinct shapes, ``--seeds`` each (default 8: 352
images). For controls that need subjects, the suite fills them in from the caption: Attend-and-Excite's
``subjects`` become the caption's shape nouns when the recipe leaves them out (or writes ``auto``).

With an ``excite`` control the report also says what A&E did to the attention it maximises, so a run where it
changes no image shows why. A&E's reading of subject j is m_j, the max over the grid of j's smoothed attention
(``attnctl.controls.excite``); the weakest subject is the one with the smallest m_j, and 1 - min_j m_j is A&E's
loss. Each row's ``baseline`` and ``controlled`` get ``excite``: ``{"max_attention": {subject: m_j},
"weakest": subject, "weakest_max": min_j m_j, "overlap": o, "refinement_iterations": n}`` (0 in the baseline), read at the last
step of the excitation window (the last step A&E reads; before its first update both runs have the same latents, so
the same readings). The controlled run's are A&E's own run metadata; the baseline's come from the same control in
``measure_only`` mode (the same forward and readings, no latent change: the baseline images are those without it),
run with the baseline's own batches. The report gets ``excite_attention``: for ``all`` rows, the rows
``neglected`` in the baseline (some shape missing; plus ``fixed``: how many of them miss none with A&E) and those
``still_neglected`` with A&E, each ``{"n", "baseline", "controlled", "delta", "delta_ci95"}`` (means of
``weakest_max``; paired bootstrap 95% interval of the change, None without rows), and ``overlap``: the same for
the subjects' map overlap (``attnctl.controls.excite.overlap``, what A&E's ``separation`` lowers) on all rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..shapes.benchmark import prompt_set
from ..shapes.data import COLOURS, SHAPES, parse_caption
from ..shapes.detect import detect
from ..shapes.validate import match
from .base import Suite, paired_bootstrap, seeded_cases

# ``excite`` options that only shape its latent update, not what it reads: the baseline's measurement leaves them
# out, so a sweep over them shares one baseline.
_UPDATE_ONLY = ("scale_factor", "scale_range", "thresholds", "max_refinement_steps", "separation")


@dataclass
class Output:
    """A generated image and, with an ``excite`` control (or its measuring-only twin), its per-image A&E
    diagnostics (one entry of the control's run metadata ``images``)."""

    image: np.ndarray
    excite: dict | None = None


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

    def baseline_controls(self, settings, cases):
        """With an ``excite`` control: the same control, measuring only, with one subject list per case."""
        options = settings.controls.get("excite")
        if not isinstance(options, dict):
            return {}
        measuring = {k: v for k, v in options.items() if k not in _UPDATE_ONLY}
        subjects = [self.fill("excite", dict(options), c).get("subjects") for c in cases]
        if all(isinstance(s, list) and all(isinstance(w, str) for w in s) for s in subjects):
            measuring["subjects"] = subjects
        measuring["measure_only"] = True
        return {"excite": measuring}

    def generate(self, pipe, settings, cases, controls):
        images, diagnostics = self.images_and_diagnostics(pipe, settings, cases, controls)
        per_image = (diagnostics.get("excite") or {}).get("images")
        if not per_image or len(per_image) != len(images):
            return images
        return [Output(image, entry) for image, entry in zip(images, per_image)]

    def score(self, case, output):
        image, excite = (output.image, output.excite) if isinstance(output, Output) else (output, None)
        dets = detect(image)
        result = match(case.prompt, dets)
        scores = {"all_present": float(result.all_present), "neglect_rate": float(result.neglect),
                  "binding_errors": float(result.binding_error), "status": result.status,
                  "detections": [[d.colour, d.shape] for d in dets]}
        if excite is not None and excite.get("max_attention"):
            scores["excite"] = weakest_subject(excite)
        return scores

    def summary(self, rows, controlled):
        measured = [r for r in rows if "excite" in r["baseline"] and "excite" in (r.get("controlled") or {})]
        if not controlled or not measured:
            return {}
        neglected = [r for r in measured if r["baseline"].get("neglect_rate")]
        still = [r for r in neglected if r["controlled"].get("neglect_rate")]
        return {"excite_attention": {
            "all": _paired_means(measured),
            "neglected": {**_paired_means(neglected), "fixed": len(neglected) - len(still)},
            "still_neglected": _paired_means(still),
            "overlap": _paired_means(measured, "overlap"),
        }}

    def summary_lines(self, report):
        block = report.get("excite_attention")
        if not block:
            return []

        def line(label, stats):
            if not stats["n"]:
                return f"  {label} (0 rows)"
            low, high = stats["delta_ci95"]
            return (f"  {label} ({stats['n']} rows): {stats['baseline']:.3f} -> {stats['controlled']:.3f} "
                    f"({stats['delta']:+.3f} [{low:+.3f}, {high:+.3f}])")

        neglected = block["neglected"]
        return ["A&E: the weakest subject's max attention at the end of the window, baseline -> controlled "
                "(change [95% CI]):",
                line("all", block["all"]),
                line("neglected in the baseline", neglected) + f"; {neglected['fixed']} of {neglected['n']} "
                "fixed (no shape missing with A&E)",
                line("still neglected with A&E", block["still_neglected"]),
                line("subjects' map overlap, all", block["overlap"])]


def weakest_subject(entry: dict) -> dict:
    """The row fields of one image's A&E diagnostics: every subject's reading, the weakest subject and its."""
    maxima = dict(entry["max_attention"])
    weakest = min(maxima, key=maxima.get)
    return {"max_attention": maxima, "weakest": weakest, "weakest_max": maxima[weakest],
            "overlap": float(entry.get("overlap", 0.0)),
            "refinement_iterations": int(entry.get("refinement_iterations", 0))}


def _paired_means(rows: list[dict], key: str = "weakest_max") -> dict:
    """Means of the rows' baseline and controlled ``key`` reading, their difference and its paired 95% interval."""
    base = [r["baseline"]["excite"][key] for r in rows]
    ctrl = [r["controlled"]["excite"][key] for r in rows]
    if not rows:
        return {"n": 0, "baseline": None, "controlled": None, "delta": None, "delta_ci95": None}
    b, c = float(np.mean(base)), float(np.mean(ctrl))
    return {"n": len(rows), "baseline": b, "controlled": c, "delta": c - b,
            "delta_ci95": paired_bootstrap(base, ctrl)}


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

__all__ = ["CROWDED", "SUITE", "Output", "crowds", "subjects_of", "triples", "weakest_subject"]
