"""``bench pipeline`` settings of the ``nag`` control: NAG without CFG (one denoiser row per image), the way
guidance-distilled models take a negative prompt. Compare with ``baseline`` (no CFG, no negative prompt) and
``cfg`` (CFG, whose unconditional rows a negative prompt would take: the same cost). ``nag[whole-block]`` runs
the MM-DiT negative text stream through whole blocks (the reference the default text-only pass equals).

``flops`` counts the floating-point operations of one call per setting (``torch.utils.flop_counter``, with
PyTorch's CPU flash-attention kernel counted like the other attention kernels): a measure of the work that a
busy machine's timings cannot blur. ``python -m attnctl.bench.nag [--quick] [family ...]`` prints the ratios.
"""

from __future__ import annotations

import argparse
import json


def _nag(ctx, text_only: bool):
    from ..controls.nag import Nag
    from ..engine import apply

    from .pipeline import NEGATIVE

    control = Nag(negative_prompt=NEGATIVE)
    control.text_only = text_only

    def generate():
        with apply(ctx.pipe, control):
            return ctx.pipe(**ctx.kwargs(cfg=False))

    return generate


def nag(ctx):
    """NAG with the official defaults (s 4, tau 2.5, alpha 0.25) on every text-reading layer, no CFG."""
    return _nag(ctx, True)


def nag_whole_block(ctx):
    """``nag``, the MM-DiT negative text stream run through whole blocks (image tokens included)."""
    return _nag(ctx, False)


nag.controls = ("nag",)  # bench pipeline runs it where the control runs, and skips it elsewhere with a note
nag_whole_block.families = ("sd3", "flux", "shapes-dit")


def count_flops(generate) -> int:
    """Floating-point operations of ``generate()`` (matmuls and attention kernels, CPU flash attention too)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        generate()
    return counter.get_total_flops()


def flops(family: str, settings=("baseline", "cfg", "nag", "nag[whole-block]"), quick: bool = False) -> dict:
    """FLOPs of one call of each setting on ``family`` at the benchmark's size, and each one's ratio to
    ``baseline``."""
    from .pipeline import _context, _setting

    ctx = _context(family, quick)
    counts = {name: count_flops(_setting(name)(ctx)) for name in settings}
    base = counts.get("baseline")
    return {"family": family, "size": f"{ctx.height}x{ctx.width}", "steps": ctx.steps, "flops": counts,
            "vs_baseline": {n: c / base for n, c in counts.items()} if base else None}


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=["sd3", "flux", "shapes-dit"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for family in args.families:
        print(json.dumps(flops(family, quick=args.quick)))


if __name__ == "__main__":
    _main()
