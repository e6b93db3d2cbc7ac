"""The engine: hooks a pipeline's attention and denoiser, and runs the control protocol.

``apply(pipe, controls)`` is a context manager. On entry it checks that no other ``apply`` controls the same
modules (pipelines made with ``from_pipe`` share them: an error), binds the controls (selectors resolve, bad
options raise) and only then changes anything. Every attention module keeps its own processor (diffusers',
IP-Adapter's, a user's subclass, with its attention backend); its ``forward`` gets a thin instance-level wrapper
that marks the site so ``attnctl.intercept`` can hand the processor's attention call to the controls (see that
module). Thin wrappers also go around the denoiser's ``forward`` (batch layout, step clock, extra branches,
latent updates), ``scheduler.step`` (latent updates reach the pipeline's own latents), ``encode_prompt`` (which
prompt each sample has; a new pipeline call starts) and, where the model has one, ``cache_context`` (FLUX's
separate uncond call). On exit, including on exceptions, everything is put back exactly as it was.

Per-call state lives in the ``Session`` (one per ``apply``), in ``Frame`` (one per denoiser call) and, for the
attention module running, in a context variable; the only process-wide change is the pass-through
``dispatch_attention_fn`` name (``attnctl.intercept``), so two pipelines in one process do not interfere.

One module per job:

``session``     ``Session`` and ``apply``: the protocol run in each denoiser call, pipeline-call boundaries
``install``     every change to the pipeline recorded in an ``Undo`` log and put back on exit
``clock``       ``StepInfo``: which sampling step a denoiser call belongs to
``rows``        ``Frame`` and the row layout of a denoiser call (roles from ``attnctl.layouts``), row indexing
``guidance``    folding a control's guidance delta into the rows the pipeline combines
``late_rows``   extra rows joining the batch at the first block where a control acts
``latents``     latent updates (``LatentUpdate``) from the denoiser call to ``scheduler.step``
``calls``       ``AttentionCall``: one attention computation as controls see and edit it
"""

from __future__ import annotations

from ..layouts import BatchLayout
from .calls import AttentionCall
from .clock import StepInfo
from .latents import LatentUpdate
from .rows import Frame, get_sample, take_rows, with_sample
from .session import Session, apply

__all__ = ["AttentionCall", "BatchLayout", "Frame", "LatentUpdate", "Session", "StepInfo", "apply", "get_sample",
           "take_rows", "with_sample"]
