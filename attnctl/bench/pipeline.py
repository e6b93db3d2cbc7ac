"""``attnctl bench pipeline``: seconds per image and peak memory of each setting on each family (tiny random pipelines and the embedded models).

Settings are a registry, ``SETTINGS = {name: "module:function"}``: the core gives ``baseline`` (no CFG) and
``cfg``; each control adds its own rows (``cfg+pag``, ``cfg+excite``, ...) with one line here. A setting
function ``make(ctx: BenchContext) -> Callable[[], object]`` returns a closure that generates one image; it may
install controls around the call (``attnctl.apply``) or build another pipeline from ``ctx.pipe``'s components.
A setting that runs on some families only says which in its function's ``families`` attribute (benchmark family
names), or names the controls it applies in ``controls`` (it then runs where every one of them does: each
control's own ``families``); a run skips it elsewhere with a note (``plan``), so the bare command, and any
``--families`` without ``--settings``, runs every setting where it can.

Every (family, setting) runs in a fresh Python process, alone, so its peak resident set is its own
(on CPU the peak RSS of a fresh process; on CUDA ``torch.cuda.max_memory_allocated``).
Inside that process: one warm-up call, then ``repeats`` timed calls; the median is reported with min and max.
Sizes follow ``attnctl bench overhead`` (one step >= ~20 ms on 2 cores).

``interleave=True`` (``--interleave``) measures the ratios instead: one fresh process per family runs every
setting in turn, round after round (the order rotated each round), so a shared machine's slow minutes fall on
all settings alike; separate processes per setting put them on whichever setting ran then (seen here: the same
setting 0.96x and 1.26x CFG in two runs). Its ``peak_mem_mb`` is the shared process's (``peak_shared``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import AttnctlError, did_you_mean
from .overhead import QUICK, SIZES, bench_pipeline, call_kwargs, check_families

# Registry: one line per setting. Control issues add theirs here.
SETTINGS: dict[str, str] = {
    "baseline": "attnctl.bench.pipeline:baseline",
    "cfg": "attnctl.bench.pipeline:cfg",
    "cfg+pag": "attnctl.bench.pag:cfg_pag",
    "cfg+pag[0-0.2]": "attnctl.bench.pag:cfg_pag_early",
    "cfg+pag[all-blocks]": "attnctl.bench.pag:cfg_pag_all_blocks",
    "pag": "attnctl.bench.pag:pag",
    "cfg+excite": "attnctl.bench.excite:cfg_excite",
    "diffusers-excite": "attnctl.bench.excite:diffusers_excite",
    "nag": "attnctl.bench.nag:nag",
    "nag[whole-block]": "attnctl.bench.nag:nag_whole_block",
}

PROMPT = "a red circle and a blue square"
NEGATIVE = "a green triangle"


@dataclass
class BenchContext:
    """What a setting needs: the family, its pipeline (tiny, or an embedded model) and the keyword arguments of one plain call.

    ``kwargs()`` returns fresh call arguments (a new seeded generator each time) for prompt ``PROMPT`` at the
    benchmark's size and step count, CFG on (``guidance_scale`` 5; FLUX: true CFG 4 with a negative prompt).
    """

    family: str
    pipe: object
    height: int
    width: int
    steps: int
    extra: dict = field(default_factory=dict)

    def kwargs(self, cfg: bool = True, **overrides) -> dict:
        kwargs = call_kwargs(self.family, self.steps, self.height, self.width)
        kwargs["prompt"] = PROMPT
        if self.family in ("flux", "qwenimage"):  # CFG as true CFG: a negative prompt, a second call per step
            if cfg:
                kwargs.update(true_cfg_scale=4.0, negative_prompt=NEGATIVE)
        elif self.family == "zimage":  # ZImagePipeline runs CFG whenever guidance_scale > 0 (Turbo: 0)
            kwargs["guidance_scale"] = 5.0 if cfg else 0.0
        else:
            kwargs["guidance_scale"] = 5.0 if cfg else 1.0
        kwargs.update(overrides)
        return kwargs


def baseline(ctx: BenchContext) -> Callable[[], object]:
    """The stock pipeline without CFG (one denoiser row per image)."""
    return lambda: ctx.pipe(**ctx.kwargs(cfg=False))


def cfg(ctx: BenchContext) -> Callable[[], object]:
    """The stock pipeline with classifier-free guidance."""
    return lambda: ctx.pipe(**ctx.kwargs(cfg=True))


def _setting(name: str) -> Callable[[BenchContext], Callable[[], object]]:
    if name not in SETTINGS:
        raise AttnctlError(f"unknown pipeline setting {name!r}{did_you_mean(name, SETTINGS)}; "
                           f"allowed: {', '.join(SETTINGS)}")
    module, func = SETTINGS[name].split(":")
    return getattr(importlib.import_module(module), func)


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _context(family: str, quick: bool) -> BenchContext:
    height, width, steps = (QUICK if quick else SIZES)[check_families([family])[0]]
    pipe = bench_pipeline(family)
    if torch.cuda.is_available():
        pipe.to("cuda")
    return BenchContext(family, pipe, height, width, steps)


def _timed(generate: Callable[[], object]) -> float:
    start = time.perf_counter()
    generate()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _row(ctx: BenchContext, setting: str, times: list[float]) -> dict:
    return {"family": ctx.family, "setting": setting, "seconds_per_image": statistics.median(times),
            "min_s": min(times), "max_s": max(times), "peak_mem_mb": _peak_mb(),
            "size": f"{ctx.height}x{ctx.width}", "steps": ctx.steps, "runs": len(times)}


def measure(family: str, setting: str, repeats: int, quick: bool) -> dict:
    """Time ``setting`` on ``family`` in this process (call it in a fresh one for a meaningful peak)."""
    ctx = _context(family, quick)
    generate = _setting(setting)(ctx)
    with torch.no_grad():
        generate()  # warm-up
        times = [_timed(generate) for _ in range(max(1, repeats))]
    return _row(ctx, setting, times)


def measure_interleaved(family: str, settings: list[str], repeats: int, quick: bool) -> list[dict]:
    """Time every setting on ``family`` in this process, one call of each per round, the order rotated."""
    ctx = _context(family, quick)
    generators = {name: _setting(name)(ctx) for name in settings}
    times: dict[str, list[float]] = {name: [] for name in settings}
    with torch.no_grad():
        for generate in generators.values():
            generate()  # warm-up
        for r in range(max(1, repeats)):
            for name in settings[r % len(settings):] + settings[: r % len(settings)]:
                times[name].append(_timed(generators[name]))
    return [dict(_row(ctx, name, times[name]), peak_shared=True) for name in settings]


# The model family of each benchmark family (the tiny ones are named after theirs).
MODEL_FAMILY = {"shapes": "sd15", "shapes-dit": "sd3"}


def _families_of(name: str) -> tuple[str, ...] | None:
    """The benchmark families setting ``name`` can run on (its function's ``families``, or those where every
    control in its ``controls`` runs; None = every family)."""
    from ..controls import control_class
    from .overhead import FAMILIES

    function = _setting(name)
    families = getattr(function, "families", None)
    controls = [control_class(c) for c in getattr(function, "controls", ())]
    if controls:
        families = tuple(f for f in (families or FAMILIES)
                         if all(MODEL_FAMILY.get(f, f) in c.families for c in controls))
    return families


def applies(name: str, family: str) -> bool:
    """Whether setting ``name`` can run on benchmark family ``family``."""
    families = _families_of(name)
    return families is None or family in families


def plan(families, settings, interleave: bool) -> list[tuple[str, list[str]]]:
    """The (family, settings) jobs of a run, each its own fresh process: every setting on every family that can take
    it. A setting a family cannot take (diffusers' Attend-and-Excite pipeline exists for SD1.x only; NAG's
    whole-block reference is timed on SD3, FLUX and shapes-dit only) is skipped there with a note on stderr, so the
    bare command and any ``--families`` without ``--settings`` run. A setting named in ``settings`` that none of the
    chosen families can take is an error (with the default settings it is only a note). Unknown names fail here,
    before any process starts."""
    names = list(settings or SETTINGS)
    families = check_families(families)
    for name in list(names):
        if not any(applies(name, family) for family in families):
            where = ", ".join(_families_of(name)) or "no benchmark family"
            if settings:
                raise AttnctlError(f"bench pipeline: {name} runs on {where} only, not on the chosen families "
                                   f"{', '.join(families)}; add one of them to --families")
            print(f"note: bench pipeline: skipping {name}: it runs on {where} only, none of the chosen families "
                  f"{', '.join(families)}", file=sys.stderr)
            names.remove(name)
    per_family = []
    for family in families:
        chosen = [name for name in names if applies(name, family)]
        for name in names:
            if name not in chosen:
                print(f"note: bench pipeline: skipping {name} on {family}: it runs on "
                      f"{', '.join(_families_of(name))} only", file=sys.stderr)
        if chosen:
            per_family.append((family, chosen))
    if interleave:
        return per_family
    return [(family, [name]) for family, chosen in per_family for name in chosen]


def run(repeats: int = 5, families=None, quick: bool = False, settings=None, interleave: bool = False):
    jobs = plan(families, settings, interleave)
    rows = []
    env = dict(os.environ)
    for family, chosen in jobs:
        cmd = [sys.executable, "-m", "attnctl.bench.pipeline", "--family", family, "--settings", ",".join(chosen),
               "--repeats", str(repeats)] + (["--quick"] if quick else []) + (["--interleave"] if interleave else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise AttnctlError(f"bench pipeline {family}/{','.join(chosen)} failed:\n{done.stderr.strip()[-2000:]}")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    by_cfg = {r["family"]: r["seconds_per_image"] for r in rows if r["setting"] == "cfg"}
    for r in rows:
        if r["family"] in by_cfg:
            r["vs_cfg"] = r["seconds_per_image"] / by_cfg[r["family"]]
    return rows, ["family", "setting", "size", "seconds_per_image", "min_s", "max_s", "vs_cfg", "peak_mem_mb"]


def _main() -> None:  # the fresh process of one family and its setting(s)
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--interleave", action="store_true")
    args = parser.parse_args()
    names = args.settings.split(",")
    if args.interleave:
        rows = measure_interleaved(args.family, names, args.repeats, args.quick)
    else:
        rows = [measure(args.family, name, args.repeats, args.quick) for name in names]
    print(json.dumps(rows))


if __name__ == "__main__":
    _main()
