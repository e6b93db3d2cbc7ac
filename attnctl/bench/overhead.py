"""``attnctl bench overhead``: per-step time of each family, stock vs. through attnctl with no control.

Families: the tiny random pipelines (``sd15``, ``sdxl``, ``sd3``, ``flux``, ``flux2``, ``chroma``, ``qwenimage``,
``zimage``) and the embedded trained models
(``shapes``, ``shapes-dit``, 64 px at 25 steps as a user runs them). Sizes are chosen so one step takes at
least ~20 ms on 2 CPU cores (shorter steps would mostly measure timer noise); stock and attnctl runs alternate
(A B A B ...) so drift hits both, and the median of ``repeats`` runs is reported with min and max.
``us_per_call`` is the extra time per attention call.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..errors import AttnctlError, did_you_mean

# (height, width, steps) per family: at least ~20 ms per step on 2 cores; the embedded models as users run them.
# Step counts are multiples of 5, so a window of the first 20% (bench pipeline's cfg+pag[0-0.2]) is exactly 20%.
SIZES = {"sd15": (96, 96, 5), "sdxl": (128, 128, 5), "sd3": (96, 96, 5), "flux": (192, 192, 5),
         "flux2": (192, 192, 5), "chroma": (192, 192, 5), "qwenimage": (384, 384, 5),
         "zimage": (128, 128, 5), "shapes": (64, 64, 25), "shapes-dit": (64, 64, 25)}
QUICK = {"sd15": (32, 32, 2), "sdxl": (32, 32, 2), "sd3": (32, 32, 2), "flux": (32, 32, 2),
         "flux2": (32, 32, 2), "chroma": (32, 32, 2), "qwenimage": (32, 32, 2),
         "zimage": (32, 32, 2), "shapes": (64, 64, 2), "shapes-dit": (64, 64, 2)}
EMBEDDED = ("shapes", "shapes-dit")
FAMILIES = ("sd15", "sdxl", "sd3", "flux", "flux2", "chroma", "qwenimage", "zimage", *EMBEDDED)


def check_families(families) -> list[str]:
    """The requested families (default: all), each one known, or an error naming the allowed ones."""
    names = list(families or FAMILIES)
    for name in names:
        if name not in SIZES:
            raise AttnctlError(f"unknown benchmark family {name!r}{did_you_mean(name, FAMILIES)}; "
                               f"allowed: {', '.join(FAMILIES)}")
    return names


def bench_pipeline(family: str):
    """The pipeline a benchmark times: a tiny random one, or an embedded model loaded like a user would."""
    if family in EMBEDDED:
        from ..models import load

        return load(family)
    from ..testing import tiny_pipeline

    return tiny_pipeline(family)


def call_kwargs(family: str, steps: int, height: int, width: int) -> dict:
    """Keyword arguments of one seeded call (latents out, no VAE decode) at the benchmark's size."""
    if family in EMBEDDED:
        return dict(num_inference_steps=steps, height=height, width=width, guidance_scale=4.5,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
    from ..testing import tiny_call_kwargs

    return tiny_call_kwargs(family, steps=steps, height=height, width=width)


def _timed(pipe, family, height, width, steps) -> float:
    kwargs = call_kwargs(family, steps, height, width)
    start = time.perf_counter()
    with torch.no_grad():
        pipe(prompt="a red circle and a blue square", **kwargs)  # by keyword: Flux2KleinPipeline takes `image` first
    return (time.perf_counter() - start) / steps


def run(repeats: int = 5, families=None, quick: bool = False):
    from ..engine import apply

    rows = []
    for family in check_families(families):
        height, width, steps = (QUICK if quick else SIZES)[family]
        pipe = bench_pipeline(family)
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
