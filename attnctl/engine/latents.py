"""Latent updates (protocol kind 3): a control changes the latents before a step's first denoiser call.

``LatentUpdates.update`` runs the controls that want an update at this step on the cond rows' latents (in the
scheduler's space: the denoiser's input divided by ``scale_model_input``'s factor), with gradients through
``LatentUpdate.denoise``; the change is added to the denoiser's input at once, to later calls at the same
step (FLUX's separate uncond call: ``pending_for``), and to the ``sample`` the pipeline passes to
``scheduler.step`` (``add_to_step``), so the scheduler steps from the latents the denoiser saw.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..errors import ControlError
from ..layouts import BatchLayout
from .clock import StepInfo
from .rows import Frame, get_sample, take_rows

if TYPE_CHECKING:
    from ..controls.base import Control
    from .session import Session


class LatentUpdate:
    """What a latent-updating control sees at one step (protocol kind 3).

    ``z``: (n_samples, ...) latents of the conditional rows in the scheduler's space (what ``scheduler.step``
    receives). ``denoise(z)`` runs the denoiser on the conditional rows with gradients (attention hooks fire,
    ``frame.layout`` is cond-only) and returns the noise prediction.
    """

    def __init__(self, session: Session, params: dict, rows: list[int], scale: float, z: torch.Tensor,
                 frame: Frame):
        self.session, self.params, self.rows, self.scale, self.frame = session, params, rows, scale, frame
        self.z = z

    @property
    def step(self) -> StepInfo:
        return self.frame.step

    def denoise(self, z: torch.Tensor) -> torch.Tensor:
        session = self.session
        params = take_rows(self.params, self.rows, len(self.frame.layout), session.adapter.unbatched_args)
        params[session.adapter.latent_arg] = z * self.scale
        samples = tuple(self.frame.layout.samples[r] for r in self.rows)
        frame = replace(self.frame, layout=BatchLayout(("cond",) * len(self.rows), samples, self.frame.layout.kind),
                        params=params)
        previous, session.frame = session.frame, frame
        try:
            with torch.enable_grad():
                return get_sample(session.call_denoiser(params))
        finally:
            session.frame = previous


class LatentUpdates:
    """The latent change of the running step, from the denoiser call that made it to ``scheduler.step``."""

    def __init__(self, session: Session):
        self.session = session
        self.pending: tuple[int, torch.Tensor, float] | None = None  # (step index, delta (n_samples, ...), scale)

    def reset(self) -> None:
        self.pending = None

    def pending_for(self, step: StepInfo) -> tuple[torch.Tensor, float] | None:
        """The (delta, scale) an earlier call at ``step`` made, for a later call at the same step."""
        if self.pending is not None and self.pending[0] == step.index:
            return self.pending[1], self.pending[2]
        return None

    def update(self, params: dict, frame: Frame, updaters: list[Control]) -> torch.Tensor:
        """Run ``updaters`` on the cond rows; returns the denoiser's new latent input (all rows)."""
        session = self.session
        x = params[session.adapter.latent_arg]
        cond = frame.layout.rows("cond")
        scale = session.clock.input_scale(params.get(session.adapter.timestep_arg, 0))
        z = (x[cond] / scale).detach()
        update = LatentUpdate(session, params, cond, scale, z, frame)
        delta = torch.zeros_like(z)
        for control in updaters:
            with torch.enable_grad():  # pipelines run under no_grad; a control's loss needs its graph
                change = control.update_latents(update)
            if change is not None:
                delta = delta + change.detach()
                update.z = z + delta
        self.pending = (frame.step.index, delta, scale)
        return x + scale * delta[list(frame.layout.samples)].to(x.dtype)

    def add_to_step(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``scheduler.step``'s arguments with the pending change added to its ``sample`` (then forgotten)."""
        if self.pending is None:
            return args, kwargs
        delta = self.pending[1]
        self.pending = None
        return add_to_sample(args, kwargs, delta)


def add_to_sample(args: tuple, kwargs: dict, delta: torch.Tensor) -> tuple[tuple, dict]:
    """``scheduler.step``'s arguments with ``delta`` (n_samples, ...) added to its ``sample`` (the latents,
    third positional argument or keyword). A latent update that cannot land is an error: dropping it would
    let the denoiser see updated latents while the scheduler steps from the old ones."""
    if "sample" in kwargs:
        sample = kwargs["sample"]
    elif len(args) >= 3:
        sample = args[2]
    else:
        raise ControlError("scheduler.step: no `sample` argument (latents) to add the pending latent update "
                           f"of {delta.shape[0]} samples to; pass the latents as `sample`")
    if not isinstance(sample, torch.Tensor) or sample.shape != delta.shape:
        got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise ControlError(f"scheduler.step: sample has {got[0] if isinstance(got, tuple) else got} rows "
                           f"(shape {got}), but the pending latent update has {delta.shape[0]} samples (shape "
                           f"{tuple(delta.shape)}); the latents stepped must be those the denoiser's cond rows "
                           "came from, one row per sample")
    sample = sample + delta.to(sample.dtype)
    if "sample" in kwargs:
        return args, {**kwargs, "sample": sample}
    return args[:2] + (sample,) + args[3:], kwargs


__all__ = ["LatentUpdate", "LatentUpdates", "add_to_sample"]
