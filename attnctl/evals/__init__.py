"""``attnctl eval SUITE``: baseline vs. a recipe's controls on the same prompts and seeds, scored by ShapesBench.

Registry: ``SUITES = {name: "module:SUITE"}``; a suite is one module with a ``Suite`` instance (see
``base.Suite``). Each control issue adds its own suite with one line here.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

from ..errors import AttnctlError, did_you_mean
from .base import Case, Settings, Suite, paired_bootstrap, print_side_by_side, read_lines, summarise

SUITES: dict[str, str] = {
    "quality": "attnctl.evals.quality:SUITE",
    "presence": "attnctl.evals.presence:SUITE",
    "edit": "attnctl.evals.edit:SUITE",
    "interp": "attnctl.evals.interp:SUITE",
    "layout": "attnctl.evals.layout:SUITE",
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


def run_eval(suite_name: str, *, model: str | None = None, recipe: str | None = None, prompts: str | None = None,
             seeds: int | None = None, limit: int | None = None, batch_size: int = 32, json_path: str | None = None,
             pipe=None, progress: bool = True, baseline_only: bool = False) -> dict:
    """Run ``suite_name``; returns (and optionally writes atomically) the report dict."""
    from tqdm.auto import tqdm

    from ..models import load
    from ..recipe import load_recipe
    from ..run import set_scheduler

    suite = get_suite(suite_name)
    rec = load_recipe(recipe) if recipe else None
    settings = Settings.from_recipe(rec, model)
    lines = read_lines(prompts) if prompts else None
    cases = suite.cases(lines, seeds or suite.default_seeds)
    if limit:
        cases = cases[:limit]
    if not cases:
        raise AttnctlError(f"eval {suite_name}: no cases to run")
    filled = [suite.controls_for(settings.controls, c) for c in cases]
    with_controls = bool(settings.controls) and not baseline_only
    if with_controls:  # validate every case's options before generating anything
        from ..recipe import Recipe

        for f in {json.dumps(f, sort_keys=True): f for f in filled}.values():
            Recipe(prompt="x", controls=f)
    pipe = pipe if pipe is not None else load(settings.model, device=settings.device, dtype=settings.dtype)
    set_scheduler(pipe, settings.scheduler, settings.scheduler_options)
    pipe.set_progress_bar_config(disable=True)

    rows = [{"prompt": c.prompt, "seed": c.seed, **({"info": c.info} if c.info else {})} for c in cases]
    runs = [("baseline", False)] + ([("controlled", True)] if with_controls else [])
    started = time.perf_counter()
    timings = {}
    for key, controlled in runs:
        t0 = time.perf_counter()
        for idx in tqdm(list(_batches(cases, filled if controlled else [{}] * len(cases), batch_size)),
                        desc=f"{suite_name} {key}", disable=not progress):
            batch = [cases[i] for i in idx]
            controls = None
            if controlled:
                from ..recipe import Recipe

                controls = Recipe(prompt="x", controls=filled[idx[0]]).build_controls()
            outputs = suite.generate(pipe, settings, batch, controls)
            for i, out in zip(idx, outputs):
                rows[i][key] = suite.score(cases[i], out)
        timings[key] = round(time.perf_counter() - t0, 2)

    report = {"suite": suite_name, "model": settings.model, "n": len(cases), "recipe": recipe,
              "settings": {"steps": settings.steps, "guidance_scale": settings.guidance_scale,
                           "size": [settings.height, settings.width], "scheduler": settings.scheduler
                           or type(pipe.scheduler).__name__, "controls": settings.controls if with_controls else {}},
              "baseline": summarise(suite.metrics, rows, "baseline"),
              "controlled": summarise(suite.metrics, rows, "controlled") if with_controls else None,
              "delta_ci95": {}, "seconds": timings, **suite.extra()}
    if with_controls:
        for m in suite.metrics:
            pairs = [(r["baseline"][m], r["controlled"][m]) for r in rows
                     if r["baseline"].get(m) is not None and r["controlled"].get(m) is not None]
            if pairs:
                report["delta_ci95"][m] = paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs])
    report["rows"] = rows
    report["wall_seconds"] = round(time.perf_counter() - started, 2)
    print_side_by_side(report, suite.metrics)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        os.replace(tmp, path)
        print(f"wrote {path}")
    return report


__all__ = ["Case", "SUITES", "Settings", "Suite", "get_suite", "run_eval"]
