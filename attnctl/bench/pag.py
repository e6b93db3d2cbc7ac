"""``bench pipeline`` settings of the ``perturb`` control: CFG + PAG on every step, and on the first 20%.

PAG uses each family's default layers (``perturb.DEFAULT_LAYERS``) at scale 3 with u = 1; the perturbed rows
run in the same denoiser call as CFG's (FLUX: in the cond call; its true-CFG uncond call stays one row).
"""

from __future__ import annotations


def _with_pag(ctx, window: dict):
    from ..controls.perturb import Perturb
    from ..engine import apply

    control = Perturb(scale=3.0, window=window)

    def generate():
        with apply(ctx.pipe, control):
            return ctx.pipe(**ctx.kwargs(cfg=True))

    return generate


def cfg_pag(ctx):
    """CFG + PAG on every step."""
    return _with_pag(ctx, {"start": 0.0, "stop": 1.0})


def cfg_pag_early(ctx):
    """CFG + PAG on the first 20% of the schedule (diffusers' guider default window is 1%-20%)."""
    return _with_pag(ctx, {"start": 0.0, "stop": 0.2})
