"""Guidance folding: turn a control's change to the final noise prediction into changes to the rows the
pipeline combines, so that the pipeline's own guidance formula (CFG, true CFG, skip-layer guidance, or none)
yields exactly that change.

A control with extra branches (PAG's perturbed rows) returns ``delta``, one row per cond row: what the
pipeline's final noise prediction should gain. ``GuidanceFold.fold`` writes it into the denoiser's output
rows; ``GuidanceFold.follow`` adds what the cond rows took to the calls the pipeline makes later at the same
step and combines with them (``attnctl.layouts.FOLLOWER_KINDS``). One ``GuidanceFold`` per session; ``reset``
at every pipeline-call boundary.
"""

from __future__ import annotations

import torch

from ..layouts import FOLLOWER_KINDS, BatchLayout
from .clock import StepInfo
from .rows import get_sample, with_sample


def reads_cond(pipe) -> bool:
    """Whether the running pipeline call reads the cond rows again after combining CFG, other than through a
    follower call: a nonzero ``guidance_rescale`` (SD1.x/SDXL). (SD3's skip-layer guidance also reads them,
    but through its own call, a ``skip_layers`` layout that takes the cond rows' delta.)"""
    try:
        rescale = float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)
    except (AttributeError, TypeError, ValueError):  # the property reads a per-call attribute
        rescale = 0.0
    return rescale > 0.0


class GuidanceFold:
    """Folds guidance deltas into a pipeline's rows, and carries them to the step's follower calls."""

    def __init__(self, pipe):
        self.pipe = pipe
        # (step index, {sample: delta}): the guidance delta the cond rows of the step's guided call took, for the
        # calls that follow it at that step (FLUX's true-CFG uncond call, SD3's skip-layer call)
        self.carry: tuple[int, dict[int, torch.Tensor]] | None = None

    def reset(self) -> None:
        self.carry = None

    def fold(self, base: torch.Tensor, layout: BatchLayout, step: StepInfo, delta: torch.Tensor) -> torch.Tensor:
        """Change the rows the pipeline combines so that its final noise prediction gains ``delta``.

        ``base``: (B, ...) the denoiser's rows; ``delta``: (n_cond, ...) one row per cond row of ``layout``. CFG
        forms uncond + w (cond - uncond), weights summing to one, so adding delta to both the uncond and the cond
        rows of a sample adds exactly delta for any w (w = 1.0001 included). Only where the pipeline reads the
        cond rows again after CFG on its own (``guidance_rescale``'s std: ``reads_cond``) must they stay the
        model's own prediction, as in diffusers' PAG pipelines; then the uncond rows alone take -delta / (w - 1),
        whose float rounding grows like w / (w - 1) (about 1e-4 relative at w = 1.0001). Without uncond rows the
        cond rows take delta. Whatever the cond rows took is carried to the calls that follow at the same step
        and that the pipeline combines with them (``attnctl.layouts.FOLLOWER_KINDS``): FLUX's true-CFG uncond
        call (neg + s (cond - neg) then gains exactly delta for any s, a scale the engine cannot read) and SD3's
        skip-layer call ((cond - skip) * slg_scale then holds no delta at all).
        """
        base = base.clone()
        cond, uncond = layout.rows("cond"), layout.rows("uncond")
        delta = delta.to(base.dtype)
        self.carry = None
        if not uncond:
            base[cond] = base[cond] + delta
            self.carry = (step.index, {layout.samples[r]: delta[i] for i, r in enumerate(cond)})
            return base
        by_sample = {layout.samples[r]: i for i, r in enumerate(cond)}
        index = [by_sample[layout.samples[r]] for r in uncond]  # the cond row of each uncond row's sample
        w = float(getattr(self.pipe, "guidance_scale", 1.0))
        if w > 1.0 and reads_cond(self.pipe):
            base[uncond] = base[uncond] - delta[index] / (w - 1.0)  # cond rows unchanged: nothing to carry
        else:
            base[cond] = base[cond] + delta
            base[uncond] = base[uncond] + delta[index]
            self.carry = (step.index, {layout.samples[r]: delta[i] for i, r in enumerate(cond)})
        return base

    def follow(self, out, layout: BatchLayout, step: StepInfo):
        """A follower call (``attnctl.layouts.FOLLOWER_KINDS``) at the step of the last guided call takes the
        delta that call's cond rows took, per sample. out: the denoiser's output, rows (n, ...)."""
        carry = self.carry
        if carry is None or carry[0] != step.index or layout.kind not in FOLLOWER_KINDS:
            return out
        sample = get_sample(out).clone()
        for r, s in enumerate(layout.samples):
            if s in carry[1]:
                sample[r] = sample[r] + carry[1][s].to(sample.dtype)
        return with_sample(out, sample)


__all__ = ["GuidanceFold", "reads_cond"]
