"""``bench pipeline`` setting of the ``nag`` control: NAG without CFG (one denoiser row per image), the way
guidance-distilled models take a negative prompt. Compare with ``baseline`` (no CFG, no negative prompt) and
``cfg`` (CFG, whose unconditional rows a negative prompt would take: the same cost)."""

from __future__ import annotations


def nag(ctx):
    """NAG with the official defaults (s 4, tau 2.5, alpha 0.25) on every text-reading layer, no CFG."""
    from ..controls.nag import Nag
    from ..engine import apply

    from .pipeline import NEGATIVE

    control = Nag(negative_prompt=NEGATIVE)

    def generate():
        with apply(ctx.pipe, control):
            return ctx.pipe(**ctx.kwargs(cfg=False))

    return generate


nag.controls = ("nag",)  # bench pipeline runs it where the control runs, and skips it elsewhere with a note
