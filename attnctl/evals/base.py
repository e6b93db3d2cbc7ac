"""The evaluation frame: a suite says what to generate and how to score it; the frame does the rest.

A ``Suite`` gives cases (prompt, seed and whatever ground truth it needs: from a built-in set or from the
lines of a ``--prompts`` file), may fill in control options per case from the caption (e.g. the shape nouns
as Attend-and-Excite subjects), generates images and scores each one. ``run_eval`` runs every case twice, as
the baseline (no controls; only the suite's measuring-only ``baseline_controls``, which leave the images as they
are) and with the recipe's controls, on the same seeds, batched; it prints the two side
by side and returns one JSON report: ``{"suite", "model", "n", "baseline", "controlled",
"delta_ci95", "rows", ...}`` where ``delta_ci95[m]`` is a paired bootstrap 95% interval of the mean of
(controlled - baseline) over the rows that have metric ``m`` in both runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import AttnctlError


@dataclass
class Case:
    """One row of an evaluation: a prompt, a seed and suite-specific ground truth (``info``)."""

    prompt: str
    seed: int
    info: dict = field(default_factory=dict)


@dataclass
class Settings:
    """How images are generated: from the recipe where it sets them, else the embedded models' defaults."""

    model: str = "shapes"
    steps: int = 25
    guidance_scale: float = 4.5
    height: int = 64
    width: int = 64
    negative_prompt: str | None = None
    scheduler: str | None = None
    scheduler_options: dict = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    controls: dict = field(default_factory=dict)

    @classmethod
    def from_recipe(cls, recipe, model: str | None = None, defaults: dict | None = None) -> "Settings":
        """The recipe's settings over ``defaults`` (a suite's own, e.g. guidance 1 and its control) over the
        embedded models'. ``defaults["controls"]`` applies only without a recipe: a recipe's controls are its own."""
        s = cls()
        for name, value in (defaults or {}).items():
            if name != "controls" or recipe is None:
                setattr(s, name, json.loads(json.dumps(value)))
        if recipe is not None:
            for name in ("steps", "guidance_scale", "height", "width", "negative_prompt", "scheduler",
                         "scheduler_options", "device", "dtype", "model"):
                if name in recipe.model_fields_set and getattr(recipe, name) is not None:
                    setattr(s, name, getattr(recipe, name))
            s.controls = dict(recipe.controls)
        if model:
            s.model = model
        return s

    def call_kwargs(self) -> dict:
        kwargs = dict(num_inference_steps=self.steps, guidance_scale=self.guidance_scale, height=self.height,
                      width=self.width, output_type="np")
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = self.negative_prompt
        return kwargs


class Suite:
    """Base class of an evaluation suite. Subclasses set ``name``, ``metrics`` and implement ``cases`` and
    ``score``; ``generate`` and ``fill`` have defaults that suit text-to-image suites."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    metrics: ClassVar[dict[str, bool]] = {}  # metric -> higher is better
    default_seeds: ClassVar[int] = 8
    line_format: ClassVar[str] = "one prompt per line"
    # Settings used where the recipe does not set them (and, for ``controls``, when there is no recipe).
    settings_defaults: ClassVar[dict[str, Any]] = {}

    def cases(self, lines: list[str] | None, seeds: int) -> list[Case]:
        raise NotImplementedError

    def cases_for(self, lines: list[str] | None, seeds: int | None, model: str) -> list[Case]:
        """Cases for ``model`` (default: the same for every model); ``seeds`` None means the suite's default."""
        return self.cases(lines, seeds or self.default_seeds)

    def fill(self, name: str, options: dict, case: Case) -> dict:
        """Options of control ``name`` for ``case`` (default: the recipe's, unchanged)."""
        return options

    def controls_for(self, controls: dict, case: Case) -> dict:
        out = {}
        for name, options in controls.items():
            if isinstance(options, list):
                out[name] = [self.fill(name, dict(o), case) for o in options]
            else:
                out[name] = self.fill(name, dict(options), case)
        return out

    def baseline_controls(self, settings: Settings, cases: list[Case]) -> dict:
        """Controls that only measure, run with the baseline's pipeline call for ``cases`` (one batch, as the
        baseline batches them) so the baseline reports what the recipe's controls report on the controlled images
        (e.g. Attend-and-Excite's attention readings): ``{name: options}`` as in a recipe, {} for none (default).
        They must leave the images unchanged."""
        return {}

    def generate(self, pipe, settings: Settings, cases: list[Case], controls: list | None) -> list[Any]:
        """Outputs for ``cases`` (one batched pipeline call; per-case seeded generators): uint8 images."""
        return self.images_and_diagnostics(pipe, settings, cases, controls)[0]

    def images_and_diagnostics(self, pipe, settings: Settings, cases: list[Case],
                               controls: list | None) -> tuple[list[np.ndarray], dict]:
        """``generate``'s uint8 images and the call's control diagnostics (``{control name: diagnostics}`` of
        ``Session.last_run()``; {} without controls)."""
        from ..engine import apply

        gens = [torch.Generator("cpu").manual_seed(c.seed) for c in cases]
        prompts = [c.prompt for c in cases]
        kwargs = settings.call_kwargs()
        diagnostics: dict = {}
        if controls:
            with apply(pipe, controls) as session:
                images = pipe(prompt=prompts, generator=gens, **kwargs).images
                diagnostics = session.last_run().get("controls", {})
        else:
            images = pipe(prompt=prompts, generator=gens, **kwargs).images
        return list((np.clip(images, 0, 1) * 255).round().astype(np.uint8)), diagnostics

    def score(self, case: Case, output: Any) -> dict:
        """Metric values (None = not applicable to this row) and any extra per-row fields."""
        raise NotImplementedError

    def extra(self) -> dict:
        """Suite-level fields added to the JSON (e.g. the distance a metric uses)."""
        return {}

    def summary(self, rows: list[dict], controlled: bool) -> dict:
        """Fields computed from the scored rows, added to the JSON (e.g. per-case shares, a ratio's interval)."""
        return {}

    def summary_lines(self, report: dict) -> list[str]:
        """Lines printed after the side-by-side table."""
        return []


def seeded_cases(prompts: Iterable[str], seeds: int, info=None) -> list[Case]:
    """Every prompt with seeds ``0 .. seeds-1``, prompt-major."""
    return [Case(p, s, dict(info(p)) if info else {}) for p in prompts for s in range(seeds)]


def read_lines(path: str) -> list[str]:
    """Non-empty, non-comment lines of a ``--prompts`` file."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh]
    except OSError as exc:
        raise AttnctlError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise AttnctlError(f"prompts file {path} has no prompts (one per line; '#' starts a comment)")
    return lines


def paired_bootstrap(base: list[float], ctrl: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    """95% interval of mean(ctrl - base) by resampling the pairs."""
    d = np.asarray(ctrl, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if len(d) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_bootstrap_relative_cut(base: list[float], ctrl: list[float], n: int = 2000,
                                  seed: int = 0) -> list[float]:
    """95% interval of ``1 - mean(ctrl) / mean(base)`` (the relative cut of a rate) by resampling the pairs.

    Resamples whose baseline mean is 0 (the ratio is undefined) are left out; NaNs when every one is.
    """
    b = np.asarray(base, dtype=np.float64)
    c = np.asarray(ctrl, dtype=np.float64)
    if len(b) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(b), size=(n, len(b)))
    mb, mc = b[idx].mean(axis=1), c[idx].mean(axis=1)
    keep = mb > 0
    if not keep.any():
        return [float("nan"), float("nan")]
    cuts = 1.0 - mc[keep] / mb[keep]
    return [float(np.percentile(cuts, 2.5)), float(np.percentile(cuts, 97.5))]


def summarise(metrics: dict[str, bool], rows: list[dict], key: str) -> dict[str, float | None]:
    out = {}
    for m in metrics:
        values = [r[key][m] for r in rows if r.get(key) and r[key].get(m) is not None]
        out[m] = float(np.mean(values)) if values else None
    return out


def _metric_rows(report: dict, metrics: dict[str, bool]) -> list[dict]:
    """One table row per metric of a report: baseline, controlled, their difference and its 95% interval."""
    rows = []
    for m, higher in metrics.items():
        b = report["baseline"].get(m)
        c = (report.get("controlled") or {}).get(m)
        ci = report.get("delta_ci95", {}).get(m)
        rows.append({"metric": m + (" (+)" if higher else " (-)"), "baseline": b if b is not None else "-",
                     "controlled": c if c is not None else "-",
                     "delta": (c - b) if (b is not None and c is not None) else "-",
                     "ci95": f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"})
    return rows


def setting_label(setting: dict) -> str:
    """``path=value, ...`` of one sweep setting (mappings and lists in YAML's flow style)."""
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in setting.items())


def print_side_by_side(report: dict, metrics: dict[str, bool]) -> None:
    from ..bench import print_table

    print(f"{report['suite']} on {report['model']}: {report['n']} rows")
    print_table(_metric_rows(report, metrics), ["metric", "baseline", "controlled", "delta", "ci95"])


def print_sweep_summary(result: dict, metrics: dict[str, bool]) -> None:
    """One table for a swept evaluation: a row per (setting, metric)."""
    from ..bench import print_table

    rows = [{"setting": setting_label(r["setting"]), **row} for r in result["reports"] for row in _metric_rows(r, metrics)]
    print(f"{result['suite']} on {result['model']}: {result['n']} rows, {len(result['reports'])} settings")
    print_table(rows, ["setting", "metric", "baseline", "controlled", "delta", "ci95"])


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, default=str)
