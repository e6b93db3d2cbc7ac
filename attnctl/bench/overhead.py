"""``attnctl bench overhead``: per-step time of each tiny family, stock vs. through attnctl with no control.

Sizes are chosen so one step takes at least ~20 ms on 2 CPU cores (CONTRACTS.md, Benchmarks); stock and
attnctl runs alternate (A B A B ...) so drift hits both, and the median of ``repeats`` runs is reported with
min and max. ``us_per_call`` is the extra time per attention call.
"""

from __future__ import annotations

import statistics
import time

import torch

# (height, width, steps) per family: about 20-60 ms per step on 2 cores.
SIZES = {"sd15": (96, 96, 4), "sdxl": (128, 128, 4), "sd3": (96, 96, 4), "flux": (128, 128, 4)}
QUICK = {"sd15": (32, 32, 2), "sdxl": (32, 32, 2), "sd3": (32, 32, 2), "flux": (32, 32, 2)}


def _timed(pipe, family, height, width, steps) -> float:
    from ..testing import tiny_call_kwargs

    kwargs = tiny_call_kwargs(family, steps=steps, height=height, width=width)
    start = time.perf_counter()
    with torch.no_grad():
        pipe("a red circle and a blue square", **kwargs)
    return (time.perf_counter() - start) / steps


def run(repeats: int = 5, families=None, quick: bool = False):
    from ..engine import apply
    from ..testing import TINY_FAMILIES, tiny_pipeline

    rows = []
    for family in families or TINY_FAMILIES:
        height, width, steps = (QUICK if quick else SIZES)[family]
        pipe = tiny_pipeline(family)
        _timed(pipe, family, height, width, steps)  # warm-up
        stock, ours, calls = [], [], 0
        for _ in range(max(1, repeats)):
            stock.append(_timed(pipe, family, height, width, steps))
            with apply(pipe) as session:
                ours.append(_timed(pipe, family, height, width, steps))
            calls = session.attention_calls / steps
        s, a = statistics.median(stock), statistics.median(ours)
        rows.append({
            "family": family, "size": f"{height}x{width}", "stock_s": s, "attnctl_s": a,
            "overhead": (a - s) / s, "stock_min": min(stock), "stock_max": max(stock),
            "attnctl_min": min(ours), "attnctl_max": max(ours), "calls_per_step": calls,
            "us_per_call": (a - s) / calls * 1e6 if calls else 0.0, "runs": len(stock),
        })
    return rows, ["family", "size", "stock_s", "attnctl_s", "overhead", "us_per_call", "calls_per_step", "runs"]
