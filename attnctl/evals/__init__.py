"""``attnctl eval SUITE``: baseline vs. a recipe's controls on the same prompts and seeds, scored by ShapesBench.

Registry: ``SUITES = {name: "module:SUITE"}``; a suite is one module with a ``Suite`` instance (see
``base.Suite``). Each control adds its own suite with one line here.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from pathlib import Path

from ..errors import AttnctlError, did_you_mean
from .base import (Case, Settings, Suite, paired_bootstrap, print_side_by_side, print_sweep_summary, read_lines,
                   setting_label, summarise)

SUITES: dict[str, str] = {
    "quality": "attnctl.evals.quality:SUITE",
    "presence": "attnctl.evals.presence:SUITE",
    "crowded": "attnctl.evals.presence:CROWDED",
    "edit": "attnctl.evals.edit:SUITE",
    "interp": "attnctl.evals.interp:SUITE",
    "layout": "attnctl.evals.layout:SUITE",
    "negative": "attnctl.evals.negative:SUITE",
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise AttnctlError(f"unknown eval suite {name!r}{did_you_mean(name, SUITES)}; allowed: {', '.join(SUITES)}")
    module, attr = SUITES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _batches(cases: list[Case], controls: list[dict], batch_size: int):
    """Consecutive runs of cases that share their filled-in controls, at most ``batch_size`` long."""
    start = 0
    while start < len(cases):
        end = start + 1
        key = json.dumps(controls[start], sort_keys=True)
        while end < len(cases) and end - start < batch_size and json.dumps(controls[end], sort_keys=True) == key:
            end += 1
        yield list(range(start, end))
        start = end


def _generate(suite: Suite, pipe, settings: Settings, cases: list[Case], filled: list[dict] | None,
              batch_size: int, desc: str, progress: bool, measure: bool = False) -> tuple[list[dict], float]:
    """Score every case, generated without controls (``filled`` None) or with its filled-in controls. With
    ``measure`` the baseline runs the suite's measuring-only controls (``Suite.baseline_controls``) per batch."""
    from tqdm.auto import tqdm

    from ..recipe import Recipe

    scores: list[dict] = [{} for _ in cases]
    t0 = time.perf_counter()
    for idx in tqdm(list(_batches(cases, filled or [{}] * len(cases), batch_size)), desc=desc, disable=not progress):
        batch = [cases[i] for i in idx]
        if filled:
            controls = Recipe(prompt="x", controls=filled[idx[0]]).build_controls()
        else:
            measuring = suite.baseline_controls(settings, batch) if measure else {}
            controls = Recipe(prompt="x", controls=measuring).build_controls() if measuring else None
        outputs = suite.generate(pipe, settings, batch, controls)
        for i, out in zip(idx, outputs):
            scores[i] = suite.score(cases[i], out)
    return scores, round(time.perf_counter() - t0, 2)


def _baseline_key(settings: Settings, measuring: dict | None = None) -> str:
    """What the baseline depends on: every setting but the controls (its images), and the measuring-only controls
    it runs (its diagnostics)."""
    fields = {k: v for k, v in vars(settings).items() if k != "controls"}
    return json.dumps([fields, measuring or {}], sort_keys=True, default=str)


def _write_json(path: str, report: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


def run_eval(suite_name: str, *, model: str | None = None, recipe: str | None = None, prompts: str | None = None,
             seeds: int | None = None, limit: int | None = None, batch_size: int = 32, json_path: str | None = None,
             pipe=None, progress: bool = True, baseline_only: bool = False, seed_start: int = 0) -> dict:
    """Run ``suite_name``; returns (and optionally writes atomically) the report dict.

    A recipe with a ``sweep:`` is evaluated at every setting of its grid: each setting gets its own report of
    the usual form (plus ``"setting": {path: value}``), and the baseline is generated once for all settings
    that share everything but the controls (a sweep of ``guidance_scale`` or ``steps`` gets one baseline per
    value). The swept report is ``{"suite", "model", "n", "recipe", "sweep", "complete", "reports": [...]}``;
    with ``json_path`` it is rewritten after every setting, so an interrupted sweep keeps what it finished.

    ``seed_start`` shifts every case's seed (``seed_start + s`` instead of ``s``): figures taken on seeds that
    were not used to choose a checkpoint or tune a control.
    """
    from ..models import load
    from ..recipe import Recipe, load_recipe
    from ..run import set_scheduler

    suite = get_suite(suite_name)
    rec = load_recipe(recipe) if recipe else None
    points = rec.settings() if rec is not None else [{}]
    swept = rec is not None and bool(rec.sweep)
    plans = [(point, Settings.from_recipe(rec.at(point) if swept else rec, model, suite.settings_defaults))
             for point in points]
    lines = read_lines(prompts) if prompts else None
    cases = suite.cases_for(lines, seeds, plans[0][1].model)
    if seed_start < 0:
        raise AttnctlError(f"seed_start = {seed_start}: seeds start at 0 or above")
    if seed_start:
        cases = [dataclasses.replace(c, seed=c.seed + seed_start) for c in cases]
    if limit:
        cases = cases[:limit]
    if not cases:
        raise AttnctlError(f"eval {suite_name}: no cases to run")
    fills = []
    for _, settings in plans:
        filled = None
        if settings.controls and not baseline_only:
            filled = [suite.controls_for(settings.controls, c) for c in cases]
            # validate every case's options (of every setting) before generating anything
            for f in {json.dumps(f, sort_keys=True): f for f in filled}.values():
                Recipe(prompt="x", controls=f)
        fills.append(filled)

    pipes: dict[tuple, tuple] = {}  # (model, device, dtype) -> (pipeline, its own scheduler)
    baselines: dict[str, tuple[list[dict], float]] = {}
    reports = []
    started = time.perf_counter()
    try:
        for (point, settings), filled in zip(plans, fills):
            key = (settings.model, settings.device, settings.dtype)
            if key not in pipes:
                p = pipe if pipe is not None else load(settings.model, device=settings.device, dtype=settings.dtype)
                p.set_progress_bar_config(disable=True)
                pipes[key] = (p, p.scheduler)
            p, own_scheduler = pipes[key]
            p.scheduler = own_scheduler  # each setting's scheduler options start from the pipeline's own
            set_scheduler(p, settings.scheduler, settings.scheduler_options)
            label = f" [{setting_label(point)}]" if swept else ""
            t0 = time.perf_counter()
            measure = filled is not None  # the baseline measures what the controlled run's controls report
            bkey = _baseline_key(settings, suite.baseline_controls(settings, cases) if measure else None)
            if bkey not in baselines:
                baselines[bkey] = _generate(suite, p, settings, cases, None, batch_size,
                                            f"{suite_name} baseline", progress, measure=measure)
            base_scores, base_seconds = baselines[bkey]
            timings = {"baseline": base_seconds}
            ctrl_scores = None
            if filled is not None:
                ctrl_scores, timings["controlled"] = _generate(suite, p, settings, cases, filled, batch_size,
                                                               f"{suite_name} controlled{label}", progress)
            report = _report(suite, settings, cases, recipe, type(p.scheduler).__name__, base_scores, ctrl_scores,
                             timings)
            report["wall_seconds"] = round(time.perf_counter() - t0, 2)
            if swept:
                report = {"setting": point, **report}
                print(f"setting{label}:")
            print_side_by_side(report, suite.metrics)
            for line in suite.summary_lines(report):
                print(line)
            reports.append(report)
            if json_path and swept:
                _write_json(json_path, _swept(suite_name, plans, cases, recipe, rec, reports, started))
    finally:
        for p, own_scheduler in pipes.values():
            p.scheduler = own_scheduler
    result = _swept(suite_name, plans, cases, recipe, rec, reports, started) if swept else reports[0]
    if swept:
        print_sweep_summary(result, suite.metrics)
    if json_path:
        _write_json(json_path, result)
        print(f"wrote {json_path}")
    return result


def _report(suite: Suite, settings: Settings, cases: list[Case], recipe: str | None, scheduler: str,
            base_scores: list[dict], ctrl_scores: list[dict] | None, timings: dict) -> dict:
    rows = [{"prompt": c.prompt, "seed": c.seed, **({"info": c.info} if c.info else {}), "baseline": b}
            for c, b in zip(cases, base_scores)]
    if ctrl_scores is not None:
        for row, c in zip(rows, ctrl_scores):
            row["controlled"] = c
    controlled = ctrl_scores is not None
    report = {"suite": suite.name, "model": settings.model, "n": len(cases), "recipe": recipe,
              "seeds": [min(c.seed for c in cases), max(c.seed for c in cases)],
              "settings": {"steps": settings.steps, "guidance_scale": settings.guidance_scale,
                           "size": [settings.height, settings.width], "scheduler": settings.scheduler or scheduler,
                           "controls": settings.controls if controlled else {}},
              "baseline": summarise(suite.metrics, rows, "baseline"),
              "controlled": summarise(suite.metrics, rows, "controlled") if controlled else None,
              "delta_ci95": {}, "seconds": timings, **suite.extra()}
    if controlled:
        for m in suite.metrics:
            pairs = [(r["baseline"][m], r["controlled"][m]) for r in rows
                     if r["baseline"].get(m) is not None and r["controlled"].get(m) is not None]
            if pairs:
                report["delta_ci95"][m] = paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs])
    report.update(suite.summary(rows, controlled))
    report["rows"] = rows
    return report


def _swept(suite_name, plans, cases, recipe, rec, reports, started) -> dict:
    return {"suite": suite_name, "model": plans[0][1].model, "n": len(cases), "recipe": recipe,
            "sweep": list(rec.sweep), "complete": len(reports) == len(plans), "reports": reports,
            "wall_seconds": round(time.perf_counter() - started, 2)}


__all__ = ["Case", "SUITES", "Settings", "Suite", "get_suite", "run_eval"]
