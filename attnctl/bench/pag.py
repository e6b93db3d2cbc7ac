"""``bench pipeline`` settings of the ``perturb`` control: CFG + PAG on every step, and on the first 20%.

PAG uses each family's default layers (``perturb.DEFAULT_LAYERS``) at scale 3 with u = 1; the perturbed rows
run in the same denoiser call as CFG's (FLUX: in the cond call; its true-CFG uncond call stays one row) and
join the batch at the first perturbed block. ``cfg+pag[all-blocks]`` runs them through every block instead
(``apply(..., share_prefix=False)``, the way diffusers' PAG pipelines batch them), to show what the join saves.
``pag`` is PAG without CFG (one cond row + one perturbed row per image), the way guidance-distilled FLUX runs.
"""

from __future__ import annotations


def _with_pag(ctx, window: dict, share_prefix: bool = True, cfg: bool = True):
    from ..controls.perturb import Perturb
    from ..engine import apply

    control = Perturb(scale=3.0, window=window)

    def generate():
        with apply(ctx.pipe, control, share_prefix=share_prefix):
            return ctx.pipe(**ctx.kwargs(cfg=cfg))

    return generate


def cfg_pag(ctx):
    """CFG + PAG on every step."""
    return _with_pag(ctx, {"start": 0.0, "stop": 1.0})


def cfg_pag_early(ctx):
    """CFG + PAG on the first 20% of the schedule (diffusers' guider default window is 1%-20%)."""
    return _with_pag(ctx, {"start": 0.0, "stop": 0.2})


def cfg_pag_all_blocks(ctx):
    """CFG + PAG on every step, the perturbed rows through every block (no shared prefix)."""
    return _with_pag(ctx, {"start": 0.0, "stop": 1.0}, share_prefix=False)


def pag(ctx):
    """PAG on every step without CFG (guidance-distilled FLUX's way; compare with ``baseline``)."""
    return _with_pag(ctx, {"start": 0.0, "stop": 1.0}, cfg=False)
