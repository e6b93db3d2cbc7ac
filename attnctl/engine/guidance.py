"""Guidance folding: turn a control's change to the final noise prediction into changes to the rows the
pipeline combines, so that the pipeline's own guidance formula (CFG, true CFG, skip-layer guidance, or none)
yields exactly that change.

A control with extra branches (PAG's perturbed rows) returns ``delta``, one row per cond row: what the
pipeline's final noise prediction should gain. ``GuidanceFold.fold`` writes it into the denoiser's output
rows; ``GuidanceFold.follow`` adds what the cond rows took to the calls the pipeline makes later at the same
step and combines with them (``attnctl.layouts.FOLLOWER_KINDS``). One ``GuidanceFold`` per session; ``reset``
at every pipeline-call boundary, ``release`` when the scheduler steps, at the end of a call and on exit.

Guidance rescale (``guidance_rescale > 0``: SD1.x/SDXL pipelines, diffusers' guiders in modular pipelines) reads
the cond rows a second time, for the std of ``rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale)``.
diffusers' PAG pipelines (``StableDiffusionPAGPipeline``, ``StableDiffusionXLPAGPipeline``) compute
``noise_cfg = uncond + w (cond - uncond) + s (cond - perturbed)`` and rescale it with ``noise_pred_text = cond``,
the model's own cond prediction (only under CFG); diffusers' PAG guider does the same, CFG or not. The fold
adds delta to the cond rows all the same (exact CFG for any w) and ``RescaleWatch`` puts a stand-in for
``rescale_noise_cfg`` into the module whose code calls it (the pipeline's ``__call__``, or the guider's
``forward`` while it runs), from the fold until the scheduler steps: given the cond rows the fold returned it
passes the rows as the model predicted them to the original function, given anything else its arguments
unchanged (a module shared with another pipeline in the process is not disturbed).
"""

from __future__ import annotations

import inspect
import threading

import torch

from ..layouts import FOLLOWER_KINDS, BatchLayout
from .clock import StepInfo
from .rows import get_sample, with_sample

RESCALE = "rescale_noise_cfg"


def reads_cond(pipe) -> bool:
    """Whether the running pipeline call reads the cond rows again after combining CFG, other than through a
    follower call: a nonzero ``guidance_rescale`` (SD1.x/SDXL). (SD3's skip-layer guidance also reads them,
    but through its own call, a ``skip_layers`` layout that takes the cond rows' delta.)"""
    try:
        rescale = float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)
    except (AttributeError, TypeError, ValueError):  # the property reads a per-call attribute
        rescale = 0.0
    return rescale > 0.0


def code_globals(fn) -> dict | None:
    """The globals of the module whose code ``fn`` is (through decorators such as ``torch.no_grad``): where the
    names that code calls are looked up. None for something that is not Python code."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    namespace = getattr(fn, "__globals__", None)
    return namespace if isinstance(namespace, dict) else None


# -- the stand-in for rescale_noise_cfg, shared by every session in the process -------------------------------
_LOCK = threading.Lock()
_PATCHED: dict[int, list] = {}  # id(module globals) -> [globals, original function, stand-in, users]
_WATCHING: list[GuidanceFold] = []  # the folds whose shifted cond rows a stand-in recognises


def _stand_in(original):
    def rescale_noise_cfg(noise_cfg, noise_pred_text, *args, **kwargs):
        for fold in list(_WATCHING):
            own = fold.own_cond(noise_pred_text)
            if own is not None:
                noise_pred_text = own
                break
        return original(noise_cfg, noise_pred_text, *args, **kwargs)

    rescale_noise_cfg.__wrapped__ = original
    rescale_noise_cfg.__doc__ = original.__doc__
    return rescale_noise_cfg


class RescaleWatch:
    """One session's stand-ins for ``rescale_noise_cfg`` (the module globals it patched), put back by
    ``release``. A module patched by several sessions at once gets one stand-in, restored by the last."""

    def __init__(self, fold: GuidanceFold):
        self.fold = fold
        self.modules: list[dict] = []

    def watch(self, namespace: dict | None) -> bool:
        """Put the stand-in into ``namespace`` (a module's globals) until ``unwatch`` or ``release``; False when
        the module has no ``rescale_noise_cfg`` to stand in for."""
        if namespace is None or not callable(namespace.get(RESCALE)):
            return False
        with _LOCK:
            if any(m is namespace for m in self.modules):
                return True
            entry = _PATCHED.get(id(namespace))
            if entry is None:
                original = namespace[RESCALE]
                entry = _PATCHED[id(namespace)] = [namespace, original, _stand_in(original), 0]
                namespace[RESCALE] = entry[2]
            entry[3] += 1
            if self.fold not in _WATCHING:
                _WATCHING.append(self.fold)
            self.modules.append(namespace)
        return True

    def unwatch(self, namespace: dict) -> None:
        """Put ``namespace``'s own ``rescale_noise_cfg`` back (unless another session still watches it)."""
        with _LOCK:
            if not any(m is namespace for m in self.modules):
                return
            self.modules = [m for m in self.modules if m is not namespace]
            entry = _PATCHED.get(id(namespace))
            if entry is not None:
                entry[3] -= 1
                if entry[3] <= 0:
                    del _PATCHED[id(namespace)]
                    if namespace.get(RESCALE) is entry[2]:  # a replacement made since stays
                        namespace[RESCALE] = entry[1]
            if not self.modules and self.fold in _WATCHING:
                _WATCHING.remove(self.fold)

    def release(self) -> None:
        """Put every module's own ``rescale_noise_cfg`` back."""
        for namespace in list(self.modules):
            self.unwatch(namespace)


class GuidanceFold:
    """Folds guidance deltas into a pipeline's rows, and carries them to the step's follower calls."""

    def __init__(self, pipe):
        self.pipe = pipe
        # (step index, {sample: delta}): the guidance delta the cond rows of the step's guided call took, for the
        # calls that follow it at that step (FLUX's true-CFG uncond call, SD3's skip-layer call)
        self.carry: tuple[int, dict[int, torch.Tensor]] | None = None
        # (shifted, own): the cond rows of the last fold as returned, and as the model predicted them
        self.shifted: tuple[torch.Tensor, torch.Tensor] | None = None
        self.watch = RescaleWatch(self)

    def reset(self) -> None:
        self.carry = None
        self.shifted = None
        self.watch.release()

    def release(self) -> None:
        """The pipeline's rescale function is its own again (the scheduler stepped, the call ended, the session
        exits)."""
        self.watch.release()

    def own_cond(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The model's own cond prediction for ``rows`` when they are the cond rows the last fold returned."""
        shifted = self.shifted
        if shifted is None or not isinstance(rows, torch.Tensor):
            return None
        returned, own = shifted
        if (rows.shape != returned.shape or rows.dtype != returned.dtype or rows.device != returned.device
                or not torch.equal(rows, returned)):
            return None
        return own

    def watch_pipeline(self) -> bool:
        """Stand in for the running pipeline's ``rescale_noise_cfg`` (looked up where its ``__call__`` is
        defined, the first class in its MRO whose module has one) until the scheduler steps or the call ends;
        False when there is none."""
        for cls in type(self.pipe).__mro__:
            if "__call__" in vars(cls):
                namespace = code_globals(vars(cls)["__call__"])
                if namespace is not None and RESCALE in namespace:
                    return self.watch.watch(namespace)
        return False

    def fold(self, base: torch.Tensor, layout: BatchLayout, step: StepInfo, delta: torch.Tensor) -> torch.Tensor:
        """Change the rows the pipeline combines so that its final noise prediction gains ``delta``.

        ``base``: (B, ...) the denoiser's rows; ``delta``: (n_cond, ...) one row per cond row of ``layout``. CFG
        forms uncond + w (cond - uncond), weights summing to one, so adding delta to both the uncond and the cond
        rows of a sample adds exactly delta for any w (w = 1.0001 included). Without uncond rows the cond rows
        take delta. Where the pipeline reads the cond rows again after CFG on its own (``guidance_rescale``'s
        std: ``reads_cond``), its ``rescale_noise_cfg`` is given the model's own cond rows until the scheduler
        steps (``RescaleWatch``), as diffusers' PAG pipelines compute it. Only a pipeline whose module has no
        ``rescale_noise_cfg`` keeps its cond rows the model's own, the uncond rows alone taking -delta / (w - 1)
        (float rounding then grows like w / (w - 1): about 1e-4 relative at w = 1.0001). Whatever the cond rows
        took is carried to the calls that follow at the same step and that the pipeline combines with them
        (``attnctl.layouts.FOLLOWER_KINDS``): FLUX's true-CFG uncond call (neg + s (cond - neg) then gains
        exactly delta for any s, a scale the engine cannot read) and SD3's skip-layer call ((cond - skip) *
        slg_scale then holds no delta at all).
        """
        own = base
        base = base.clone()
        cond, uncond = layout.rows("cond"), layout.rows("uncond")
        delta = delta.to(base.dtype)
        self.carry = None
        self.shifted = None
        if uncond:
            by_sample = {layout.samples[r]: i for i, r in enumerate(cond)}
            index = [by_sample[layout.samples[r]] for r in uncond]  # the cond row of each uncond row's sample
            w = float(getattr(self.pipe, "guidance_scale", 1.0))
            if w > 1.0 and reads_cond(self.pipe) and not self.watch_pipeline():
                base[uncond] = base[uncond] - delta[index] / (w - 1.0)  # cond rows unchanged: nothing to carry
                return base
            base[uncond] = base[uncond] + delta[index]
        base[cond] = base[cond] + delta
        self.carry = (step.index, {layout.samples[r]: delta[i] for i, r in enumerate(cond)})
        self.shifted = (base[cond], own[cond])
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


__all__ = ["GuidanceFold", "RescaleWatch", "code_globals", "reads_cond"]
