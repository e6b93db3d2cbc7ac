"""The step clock: which sampling step a denoiser call belongs to, read from the timestep it is given.

``StepClock.step_info(timestep)`` places a call's timestep on the running scheduler's distinct timesteps (Heun
repeats each one; img2img starts part-way: the index is into the schedule the scheduler holds). The clock is
rebuilt whenever the schedule changes and at the start of every pipeline call (``reset``): a reused tensor can
keep its id and length. ``input_scale`` is the factor ``scheduler.scale_model_input`` applies at a step, so a
latent update can be made in the scheduler's space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepInfo:
    """Where sampling is. ``progress`` = index / total over the scheduler's distinct timesteps (0 = first step)."""

    index: int
    total: int
    progress: float
    timestep: float


class StepClock:
    """Maps a denoiser call's timestep to a ``StepInfo`` on ``pipe.scheduler``'s schedule."""

    def __init__(self, pipe, timestep_scale: float = 1.0, timestep_offset: float = 0.0):
        self.pipe = pipe
        # the scheduler's timestep is offset + scale * the denoiser's (FLUX: t / 1000; Z-Image: (1000 - t) / 1000)
        self.timestep_scale = timestep_scale
        self.timestep_offset = timestep_offset
        self._key = None
        self._clock: torch.Tensor | None = None

    def reset(self) -> None:
        """Rebuild from the scheduler's timesteps at the next call (a new pipeline call starts)."""
        self._key = None

    def step_info(self, timestep) -> StepInfo:
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        t = self.timestep_offset + t * self.timestep_scale
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return StepInfo(0, 1, 0.0, t)
        key = (id(timesteps), len(timesteps))
        if key != self._key:
            values = torch.as_tensor(timesteps, dtype=torch.float64).flatten().tolist()
            distinct = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]  # Heun repeats steps
            self._key, self._clock = key, torch.tensor(distinct, dtype=torch.float64)
        index = int(torch.argmin((self._clock - t).abs()))
        total = len(self._clock)
        return StepInfo(index, total, index / total, t)

    def input_scale(self, timestep) -> float:
        """The factor ``scheduler.scale_model_input`` applies at this step (1 for most schedulers)."""
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is None or not hasattr(scheduler, "scale_model_input"):
            return 1.0
        one = torch.ones(1, dtype=torch.float64)
        t = timestep.flatten()[0] if isinstance(timestep, torch.Tensor) and timestep.ndim else timestep
        return float(scheduler.scale_model_input(one, t).flatten()[0])


__all__ = ["StepClock", "StepInfo"]
