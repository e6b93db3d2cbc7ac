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
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .adapters import adapter_for
from .adapters.base import Site
from .attention import AttentionRequest, attend, key_probabilities
from .controls.base import Control
from .errors import ControlError, ProcessorError
from .intercept import patch_dispatch, wrap_forward
from .layouts import FOLLOWER_KINDS, GUIDED_KINDS, BatchLayout, DenoiserCall, layout_for
from .tokens import find_phrase

_MISSING = object()


@dataclass(frozen=True)
class StepInfo:
    """Where sampling is. ``progress`` = index / total over the scheduler's distinct timesteps (0 = first step)."""

    index: int
    total: int
    progress: float
    timestep: float


@dataclass
class Frame:
    """One denoiser call: its step, its batch layout and the geometry every attention call shares."""

    step: StepInfo
    layout: BatchLayout
    latent_hw: tuple[int, int] | None
    text_len: int | None
    params: dict = field(repr=False, default_factory=dict)


class AttentionCall:
    """One attention computation, described for controls. q/k/v: (B, H, S, D).

    ``text``: the text tokens' span in the key sequence (None for self-attention); ``image``: the image tokens'
    span in the query sequence; ``grid``: (h, w) of the image tokens. Controls edit the call through
    ``add_bias``, ``perturb``, ``capture``, ``then`` or by replacing ``q``/``k``/``v``; ``heads`` holds the
    heads the current control selected at this site (None = all).
    """

    def __init__(self, session: Session, site: Site, q, k, v, text: slice | None, image: slice, bias=None):
        self.session = session
        self.site = site
        self.frame: Frame = session.frame
        self.q, self.k, self.v = q, k, v
        self.text = text
        self.image = image
        self.bias = bias
        self.u: torch.Tensor | None = None
        self.mode = "full"
        self.heads: tuple[int, ...] | None = None
        self._captures: list[tuple[torch.Tensor, Any]] = []
        self._then: list[Any] = []

    @property
    def layout(self) -> BatchLayout:
        return self.frame.layout

    @property
    def step(self) -> StepInfo:
        return self.frame.step

    @property
    def grid(self) -> tuple[int, int]:
        n_image = self.image.stop - self.image.start
        return self.session.adapter.image_grid(self.frame.latent_hw, n_image)

    def text_positions(self, sample: int, phrase: str) -> list[int]:
        """Positions of ``phrase`` of this sample's prompt in the key sequence (offset by the text span)."""
        if self.text is None:
            raise ControlError(f"{self.site.name} is self-attention: it has no text tokens")
        return [self.text.start + p for p in self.session.text_positions(sample, phrase)]

    def add_bias(self, bias: torch.Tensor) -> None:
        """Add to the pre-softmax scores; ``bias`` broadcasts to (B, H, Sq, Sk) (a (Sk,) bias is per key).
        A boolean bias (or an existing boolean attention mask) means True = may attend, i.e. 0 / -inf."""
        while bias.ndim < 4:
            bias = bias.unsqueeze(0)
        bias = self._additive(bias)
        self.bias = bias if self.bias is None else self._additive(self.bias) + bias

    def _additive(self, bias: torch.Tensor) -> torch.Tensor:
        if bias.dtype == torch.bool:
            return torch.zeros(bias.shape, dtype=self.q.dtype, device=bias.device).masked_fill(~bias, float("-inf"))
        return bias.to(self.q.dtype)

    def perturb(self, u: torch.Tensor, mode: str = "full") -> None:
        """Move each (row, head) map towards identity by ``u`` (B, H) in [0, 1]. Strengths from several controls
        combine by maximum; they must agree on ``mode`` (one attention computation has one mode)."""
        if self.u is not None and mode != self.mode:
            raise ControlError(f"{self.site.name}: two controls perturb this attention layer, with perturb mode "
                               f"{mode!r} and {self.mode!r}; one layer takes one mode (allowed: 'full' or 'image'), "
                               "so give the controls the same mode or disjoint layers")
        self.u = u if self.u is None else torch.maximum(self.u, u)
        self.mode = mode

    def capture(self, positions: list[int], fn) -> None:
        """After attention, call ``fn(probs)`` with probabilities (B, H, Sq, len(positions)) for those keys."""
        self._captures.append((torch.as_tensor(positions, dtype=torch.long), fn))

    def then(self, fn) -> None:
        """Call ``fn(out) -> out`` on the attention output (B, H, Sq, D)."""
        self._then.append(fn)

    def compute(self) -> torch.Tensor:
        for positions, fn in self._captures:
            fn(key_probabilities(self.q, self.k, positions, bias=self.bias))
        out = attend(AttentionRequest(self.q, self.k, self.v, bias=self.bias, u=self.u, mode=self.mode,
                                      text=self.text), backend=self.session.backend)
        for fn in self._then:
            out = fn(out)
        return out


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
                return get_sample(session.forward_original(**params))
        finally:
            session.frame = previous


def take_rows(value, rows: list[int], n: int, skip: Iterable[str] = (), _key: str | None = None):
    """Index every batch-major tensor (first dim ``n``) in a nested dict/list by ``rows``; leave the rest."""
    if _key is not None and _key in skip:
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim > 0 and value.shape[0] == n:
            return value[rows]
        return value
    if isinstance(value, dict):
        return {k: take_rows(v, rows, n, skip, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (torch.Tensor, list, tuple)) for v in value):
        # tensors, or nested sequences of them: IP-Adapter's encoder_hidden_states is (text, [image prompts])
        return type(value)(take_rows(v, rows, n, skip) for v in value)
    return value


def get_sample(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def with_sample(out, sample: torch.Tensor):
    if isinstance(out, torch.Tensor):
        return sample
    if isinstance(out, tuple):
        return (sample,) + tuple(out[1:])
    if isinstance(out, list):
        return [sample] + list(out[1:])
    out.sample = sample
    return out


class Session:
    """The state of one ``apply``: the pipeline, its adapter and sites, the controls and the current call."""

    def __init__(self, pipe, controls: Iterable[Control] = (), *, backend: str | None = None,
                 share_prefix: bool = True):
        self.pipe = pipe
        self.adapter = adapter_for(pipe)
        self.family = self.adapter.family
        self.denoiser = self.adapter.denoiser(pipe)
        self.site_modules = self.adapter.sites(self.denoiser)
        self.sites = [site for site, _ in self.site_modules]
        self.controls = list(controls)
        self.backend = backend
        self.hooks: dict[str, list[tuple[Control, tuple[int, ...] | None]]] = {}
        self.frame: Frame | None = None
        self.runs: list[dict] = []
        self.attention_calls = 0
        self.prompts: list[str] | None = None
        self.images_per_prompt = 1
        self._context_name: str | None = None  # the denoiser's open cache_context (FLUX: "cond" / "uncond")
        self._encoded: list[Any] = []  # this pipeline call's encode_prompt results, in order (FLUX: prompt, neg)
        self._call_open = False
        self._denoised_in_call = False
        self._pending: tuple[int, torch.Tensor, float] | None = None
        # (step index, {sample: delta}): the guidance delta the cond rows of the step's guided call took, for the
        # calls that follow it at that step (FLUX's true-CFG uncond call, SD3's skip-layer call)
        self._carry: tuple[int, dict[int, torch.Tensor]] | None = None
        self._clock_key = None
        self._clock: torch.Tensor | None = None
        self._token_cache: dict[tuple[str, str], list[int]] = {}
        self._undo: list[Any] = []
        self._call_started_at = 0.0
        self._wrapped_scheduler = None
        self._scheduler_originals: dict[int, Any] = {}
        self._last_step: StepInfo | None = None
        self.forward_original = self.denoiser.forward
        self.share_prefix = share_prefix
        self._join: tuple[list[int], int, Frame] | None = None  # (rows, n, wide frame): rows joining late
        self._joined_at: str | None = None  # the block where they joined in this pipeline call
        self._join_block: int | None = None  # index (in adapter.blocks) of the first block with a hooked site
        self._blocks: list[tuple[str, torch.nn.Module]] = []
        self._patched_classes: set[type] = set()

    # -- install / uninstall ---------------------------------------------------------------------------
    def install(self) -> None:
        if getattr(self.denoiser, "_attnctl_session", None) is not None:
            raise ProcessorError(
                "attnctl.apply is already active on this pipeline's denoiser (pipelines made with from_pipe share "
                "modules); leave the other `with attnctl.apply(...)` block first"
            )
        for site, module in self.site_modules:
            if getattr(module, "_attnctl_session", None) is not None:
                raise ProcessorError(f"{site.name} is already controlled by another attnctl.apply (pipelines made "
                                     "with from_pipe share modules); leave the other `with attnctl.apply(...)` "
                                     "block first")
        for control in self.controls:
            if self.family not in control.families:
                why = control.family_notes.get(self.family)
                raise ControlError(f"control {control.name!r} does not support the {self.family} family "
                                   f"(it supports {', '.join(control.families)})" + (f": {why}" if why else ""))
            for site_name, heads in control.bind(self).items():
                self.hooks.setdefault(site_name, []).append((control, heads))
        try:
            self._install()
        except BaseException:
            self.uninstall()
            raise

    def _set_attr(self, obj, name: str, value) -> None:
        previous = obj.__dict__.get(name, _MISSING)
        setattr(obj, name, value)

        def undo():
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, previous)

        self._undo.append(undo)

    def _install(self) -> None:
        self._set_attr(self.denoiser, "_attnctl_session", self)
        for site, module in self.site_modules:
            # The module's own processor stays; its forward is wrapped to mark the site for the interceptors.
            self._set_attr(module, "_attnctl_session", self)
            self._set_attr(module, "forward", wrap_forward(self, site, module, module.forward))
            if site.name in self.hooks:
                self.ensure_patched(type(module.processor))
        self._set_attr(self.denoiser, "forward", self._forward)
        self._forward_signature = inspect.signature(self.forward_original)
        self._wrap_scheduler()
        if hasattr(self.pipe, "encode_prompt"):
            self._encode_prompt = self.pipe.encode_prompt
            self._encode_signature = inspect.signature(self._encode_prompt)
            self._set_attr(self.pipe, "encode_prompt", self._wrapped_encode_prompt)
        if hasattr(self.pipe, "check_inputs"):
            self._check_inputs = self.pipe.check_inputs
            self._set_attr(self.pipe, "check_inputs", _dressed_as(self._check_inputs, self._wrapped_check_inputs))
        if hasattr(self.pipe, "maybe_free_model_hooks"):
            self._free_hooks = self.pipe.maybe_free_model_hooks
            self._set_attr(self.pipe, "maybe_free_model_hooks", self._wrapped_free_hooks)
        if hasattr(self.denoiser, "cache_context"):
            self._cache_context = self.denoiser.cache_context
            self._set_attr(self.denoiser, "cache_context", self._wrapped_cache_context)
        if self.share_prefix and any(type(c).branches is not Control.branches for c in self.controls):
            self._install_late_rows()

    def on_exit(self, undo) -> None:
        """Call ``undo()`` when the session uninstalls, also after a failed install (a control's own hooks)."""
        self._undo.append(undo)

    def ensure_patched(self, processor_class: type) -> None:
        """Route ``processor_class``'s ``dispatch_attention_fn`` calls through attnctl (once per class and session;
        undone on exit). SDPA needs no patch: a mode sees it around hooked modules."""
        if processor_class in self._patched_classes:
            return
        self._patched_classes.add(processor_class)
        self._undo.extend(patch_dispatch(processor_class))

    def _install_late_rows(self) -> None:
        """Hooks that let an extra branch's rows join the batch at the first block with a hooked site.

        Extra rows are copies of the cond rows, and before the first block where any control acts on attention
        every row computes exactly what its cond row computes; so the denoiser runs the original rows up to that
        block, and a pre-hook there (and on every later block and tail module) widens each batch-major argument
        with the copies. PAG on SDXL's mid block skips the whole down path for the perturbed rows.
        """
        self._blocks = self.adapter.blocks(self.denoiser)
        hooked = set(self.hooks)
        for index, (name, _) in enumerate(self._blocks):
            if any(site == name or site.startswith(name + ".") for site in hooked):
                self._join_block = index
                break
        if not self._join_block:  # no hooked site in any block, or the first block: nothing to share
            self._join_block = None
            return
        skip = self.adapter.unbatched_args | self.adapter.block_unbatched_args
        for _, module in self._blocks[self._join_block:]:
            signature = inspect.signature(module.forward)

            def widen(module, args, kwargs, signature=signature):
                if self._join is None:
                    return None
                rows, n, frame = self._join
                self.frame = frame  # from here on the processors see the wide batch's layout
                bound = signature.bind(*args, **kwargs)
                for name, value in bound.arguments.items():
                    kind = signature.parameters[name].kind
                    if name in skip:
                        continue
                    if kind is inspect.Parameter.VAR_POSITIONAL:
                        bound.arguments[name] = tuple(take_rows(v, rows, n, skip) for v in value)
                    elif kind is inspect.Parameter.VAR_KEYWORD:
                        bound.arguments[name] = {k: take_rows(v, rows, n, skip, k) for k, v in value.items()}
                    else:
                        bound.arguments[name] = take_rows(value, rows, n, skip)
                return bound.args, bound.kwargs

            handle = module.register_forward_pre_hook(widen, with_kwargs=True)
            self._undo.append(handle.remove)

    def _wrap_scheduler(self) -> None:
        """Wrap ``pipe.scheduler.step``; called again when a call starts with a scheduler swapped in meanwhile
        (e.g. DDIM for an inverted image), whose ``step`` is then wrapped too (and restored on exit)."""
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is None or not hasattr(scheduler, "step") or scheduler is self._wrapped_scheduler:
            return
        self._wrapped_scheduler = scheduler
        if id(scheduler) not in self._scheduler_originals:  # a scheduler swapped back in is wrapped already
            original = scheduler.step
            self._scheduler_originals[id(scheduler)] = original
            # Pipelines pass ``eta`` and ``generator`` only to a step whose ``inspect.signature`` names them
            # (diffusers' ``prepare_extra_step_kwargs``): a bare (*args, **kwargs) wrapper made ancestral/SDE
            # samplers draw from the global RNG and DDIM ignore ``eta``.
            self._set_attr(scheduler, "step", _dressed_as(original, self._step))
        self._scheduler_step = self._scheduler_originals[id(scheduler)]

    def uninstall(self) -> None:
        if self._call_open:
            self._end_call()
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # keep restoring the rest
                errors.append(exc)
        self.frame = None
        if errors:
            raise ProcessorError(f"restoring the pipeline failed: {errors[0]}")

    # -- pipeline-call boundaries ------------------------------------------------------------------------
    def _start_call(self, prompt, images_per_prompt) -> None:
        if self._call_open:
            self._end_call()
        if isinstance(prompt, str):
            self.prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
            self.prompts = list(prompt)
        else:
            self.prompts = None
        self.images_per_prompt = int(images_per_prompt or 1)
        self._token_cache.clear()
        self._pending = None
        self._carry = None
        self._context_name = None
        self._encoded = []
        self._call_open, self._denoised_in_call = True, False
        self._last_step = None
        self._joined_at = None
        self._clock_key = None  # rebuilt from this call's timesteps (a reused tensor can keep its id and length)
        self._wrap_scheduler()
        self._call_started_at = time.perf_counter()
        for control in self.controls:
            control.on_call_start(self)

    def _end_call(self) -> None:
        self._call_open = False
        self._encoded = []
        record = {"seconds": time.perf_counter() - self._call_started_at, "controls": {}}
        if self._joined_at is not None:
            record["extra_rows_from"] = self._joined_at  # extra branch rows shared the blocks before this one
        for control in self.controls:
            diagnostics = control.on_call_end(self)
            if diagnostics:
                record["controls"][control.name] = diagnostics
        self.runs.append(record)

    def _wrapped_check_inputs(self, *args, **kwargs):
        """A pipeline call begins (every supported pipeline checks its inputs before encoding its prompt). A call
        an earlier one left open is closed here: recorded if it reached the denoiser, dropped if it failed
        before (a bad argument after ``encode_prompt``), so its prompts and token positions cannot leak into
        this call (``encode_prompt`` only starts a call when none is open, since FLUX's true CFG encodes twice)."""
        if self._call_open:
            if self._denoised_in_call:
                self._end_call()
            else:
                self._drop_call()
        return self._check_inputs(*args, **kwargs)

    def _drop_call(self) -> None:
        """Forget a call that never reached the denoiser: no run record, no prompts, no pending updates."""
        self._call_open = False
        self.prompts = None
        self.images_per_prompt = 1
        self._token_cache.clear()
        self._pending = None
        self._carry = None
        self._encoded = []

    def _wrapped_encode_prompt(self, *args, **kwargs):
        arguments = self._encode_signature.bind_partial(*args, **kwargs).arguments
        if not self._call_open or self._denoised_in_call:
            self._start_call(arguments.get("prompt"), arguments.get("num_images_per_prompt", 1))
        result = self._encode_prompt(*args, **kwargs)
        self._encoded.append(result)  # the denoiser calls' text embeddings are matched against these
        return result

    def _wrapped_free_hooks(self, *args, **kwargs):
        if self._call_open:
            self._end_call()
        return self._free_hooks(*args, **kwargs)

    @contextlib.contextmanager
    def _wrapped_cache_context(self, name, *args, **kwargs):
        previous, self._context_name = self._context_name, name
        try:
            with self._cache_context(name, *args, **kwargs):
                yield
        finally:
            self._context_name = previous

    def last_run(self) -> dict:
        """Diagnostics of the most recent pipeline call (closes it if the pipeline did not)."""
        if self._call_open:
            self._end_call()
        return self.runs[-1] if self.runs else {}

    # -- prompts and tokens ------------------------------------------------------------------------------
    def prompt_of(self, sample: int) -> str:
        if not self.prompts:
            raise ControlError("this control needs the prompt text: call the pipeline with prompt strings "
                               "(not only prompt_embeds)")
        return self.prompts[min(sample // self.images_per_prompt, len(self.prompts) - 1)]

    def text_positions(self, sample: int, phrase: str) -> list[int]:
        """Positions of ``phrase`` in the text span of the attention calls, for ``sample``'s prompt."""
        prompt = self.prompt_of(sample)
        key = (prompt, phrase)
        if key not in self._token_cache:
            positions: list[int] = []
            for segment in self.adapter.text_segments(self.pipe):
                positions += [segment.offset + p for p in find_phrase(segment.tokenizer, prompt, phrase,
                                                                       segment.max_length)]
            self._token_cache[key] = positions
        return self._token_cache[key]

    # -- the denoiser wrapper ----------------------------------------------------------------------------
    def step_info(self, timestep) -> StepInfo:
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        t *= self.adapter.timestep_scale
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return StepInfo(0, 1, 0.0, t)
        key = (id(timesteps), len(timesteps))
        if key != self._clock_key:
            values = torch.as_tensor(timesteps, dtype=torch.float64).flatten().tolist()
            distinct = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]  # Heun repeats steps
            self._clock_key, self._clock = key, torch.tensor(distinct, dtype=torch.float64)
        index = int(torch.argmin((self._clock - t).abs()))
        total = len(self._clock)
        return StepInfo(index, total, index / total, t)

    def _input_scale(self, timestep) -> float:
        """The factor ``scheduler.scale_model_input`` applies at this step (1 for most schedulers)."""
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is None or not hasattr(scheduler, "scale_model_input"):
            return 1.0
        one = torch.ones(1, dtype=torch.float64)
        t = timestep.flatten()[0] if isinstance(timestep, torch.Tensor) and timestep.ndim else timestep
        return float(scheduler.scale_model_input(one, t).flatten()[0])

    def denoiser_call(self, params: dict, n_rows: int) -> DenoiserCall:
        """The facts a layout is decided from (``attnctl.layouts.DenoiserCall``) for a call with ``params``."""
        pipe, text = self.pipe, params.get(self.adapter.text_arg)
        # Read only a property the pipeline class defines: inside a call it reflects that call's guidance scale.
        cfg = bool(pipe.do_classifier_free_guidance) if (
            self._call_open and hasattr(type(pipe), "do_classifier_free_guidance")) else None
        source = None
        for i, result in enumerate(self._encoded):  # which encode_prompt call made these text embeddings
            first = result[0] if isinstance(result, (tuple, list)) and result else result
            if text is not None and first is text:
                source = i
                break
        samples = len(self.prompts) * self.images_per_prompt if self._call_open and self.prompts else None
        return DenoiserCall(type(self.denoiser).__name__, n_rows, params, self._call_open, cfg,
                            self._context_name, source, samples)

    def layout(self, params: dict, n_rows: int) -> BatchLayout:
        """The batch layout of a denoiser call: the adapter names its kind, ``attnctl.layouts`` lays out its rows
        (a ``LayoutError`` for a call of no known kind)."""
        call = self.denoiser_call(params, n_rows)
        return layout_for(self.adapter.call_kind(call), call, self.adapter.layout_kinds)

    def _forward(self, *args, **kwargs):
        params = dict(self._forward_signature.bind(*args, **kwargs).arguments)
        extra = params.pop("kwargs", None)
        if isinstance(extra, dict):
            params.update(extra)
        adapter = self.adapter
        x = params[adapter.latent_arg]
        n = x.shape[0]
        step = self.step_info(params.get("timestep", 0))
        layout = self.layout(params, n)
        text = params.get(adapter.text_arg)
        frame = Frame(step, layout, adapter.latent_hw(params), text.shape[1] if text is not None else None, params)
        self._denoised_in_call = True
        self._last_step = step

        # Protocol kind 3: latent updates, once per step, before the step's first denoiser call.
        if self._pending is not None and self._pending[0] == step.index:
            _, delta, scale = self._pending  # a later call at the same step (FLUX's separate uncond call)
            params[adapter.latent_arg] = x + scale * delta[list(layout.samples)].to(x.dtype)
        elif layout.kind in GUIDED_KINDS and layout.has("cond"):
            updaters = [c for c in self.controls if c.wants_latent_update(step)]
            if updaters:
                params[adapter.latent_arg] = self._update_latents(params, frame, updaters)

        # Protocol kind 2: extra branches as extra rows copied from the cond rows, one batched call.
        names: list[str] = []
        guides = []
        if layout.kind in GUIDED_KINDS and layout.has("cond"):  # never on a follower call (see layouts)
            for control in self.controls:
                wanted = control.branches(step)
                if wanted:
                    guides.append(control)
                    names += [b for b in wanted if b not in names]
        join = None
        if names:
            cond = layout.rows("cond")
            rows = list(range(n)) + cond * len(names)
            branches = list(layout.branches) + [b for b in names for _ in cond]
            samples = list(layout.samples) + [layout.samples[r] for _ in names for r in cond]
            wide = BatchLayout(tuple(branches), tuple(samples), layout.kind)
            if self._join_block is not None and not any(params.get(a) is not None for a in adapter.late_rows_blockers):
                join = (rows, n, replace(frame, layout=wide))
                self._joined_at = self._blocks[self._join_block][0]
            else:
                params = take_rows(params, rows, n, adapter.unbatched_args)
                frame = replace(frame, layout=wide, params=params)

        previous, self.frame = self.frame, frame
        self._join = join
        try:
            out = self.forward_original(**params)
        finally:
            self.frame, self._join = previous, None
        if not names:
            return self._carry_guidance(out, layout, step)
        sample = get_sample(out)
        cond = layout.rows("cond")
        preds = {"cond": sample[cond]}
        for j, name in enumerate(names):
            preds[name] = sample[n + j * len(cond) : n + (j + 1) * len(cond)]
        delta = None
        for control in guides:
            d = control.guidance(step, preds)
            if d is not None:
                delta = d if delta is None else delta + d
        base = sample[:n]
        if delta is not None:
            base = self._fold_guidance(base, layout, step, delta)
        return with_sample(out, base)

    def _fold_guidance(self, base: torch.Tensor, layout: BatchLayout, step: StepInfo,
                       delta: torch.Tensor) -> torch.Tensor:
        """Change the rows the pipeline combines so that its final noise prediction gains ``delta``.

        ``base``: (B, ...) the denoiser's rows; ``delta``: (n_cond, ...) one row per cond row of ``layout``. CFG
        forms uncond + w (cond - uncond), weights summing to one, so adding delta to both the uncond and the cond
        rows of a sample adds exactly delta for any w (w = 1.0001 included). Only where the pipeline reads the
        cond rows again after CFG on its own (``guidance_rescale``'s std: ``_reads_cond``) must they stay the
        model's own prediction, as in diffusers' PAG pipelines; then the uncond rows alone take -delta / (w - 1),
        whose float rounding grows like w / (w - 1) (about 1e-4 relative at w = 1.0001). Without uncond rows the
        cond rows take delta. Whatever the cond rows took is carried (``_carry``) to the calls that follow at the
        same step and that the pipeline combines with them (``attnctl.layouts.FOLLOWER_KINDS``): FLUX's true-CFG
        uncond call (neg + s (cond - neg) then gains exactly delta for any s, a scale the engine cannot read)
        and SD3's skip-layer call ((cond - skip) * slg_scale then holds no delta at all).
        """
        base = base.clone()
        cond, uncond = layout.rows("cond"), layout.rows("uncond")
        delta = delta.to(base.dtype)
        self._carry = None
        if not uncond:
            base[cond] = base[cond] + delta
            self._carry = (step.index, {layout.samples[r]: delta[i] for i, r in enumerate(cond)})
            return base
        by_sample = {layout.samples[r]: i for i, r in enumerate(cond)}
        index = [by_sample[layout.samples[r]] for r in uncond]  # the cond row of each uncond row's sample
        w = float(getattr(self.pipe, "guidance_scale", 1.0))
        if w > 1.0 and self._reads_cond():
            base[uncond] = base[uncond] - delta[index] / (w - 1.0)  # cond rows unchanged: nothing to carry
        else:
            base[cond] = base[cond] + delta
            base[uncond] = base[uncond] + delta[index]
            self._carry = (step.index, {layout.samples[r]: delta[i] for i, r in enumerate(cond)})
        return base

    def _reads_cond(self) -> bool:
        """Whether the running pipeline call reads the cond rows again after combining CFG, other than through a
        follower call: a nonzero ``guidance_rescale`` (SD1.x/SDXL). (SD3's skip-layer guidance also reads them,
        but through its own call, a ``skip_layers`` layout that takes the cond rows' delta. It used to be
        detected here from ``pipe._skip_guidance_layers``, an attribute diffusers 0.42 never sets: the check
        was always False.)"""
        try:
            rescale = float(getattr(self.pipe, "guidance_rescale", 0.0) or 0.0)
        except (AttributeError, TypeError, ValueError):  # the property reads a per-call attribute
            rescale = 0.0
        return rescale > 0.0

    def _carry_guidance(self, out, layout: BatchLayout, step: StepInfo):
        """A follower call (``attnctl.layouts.FOLLOWER_KINDS``) at the step of the last guided call takes the
        delta that call's cond rows took, per sample. out: the denoiser's output, rows (n, ...)."""
        carry = self._carry
        if carry is None or carry[0] != step.index or layout.kind not in FOLLOWER_KINDS:
            return out
        sample = get_sample(out).clone()
        for r, s in enumerate(layout.samples):
            if s in carry[1]:
                sample[r] = sample[r] + carry[1][s].to(sample.dtype)
        return with_sample(out, sample)

    def _update_latents(self, params: dict, frame: Frame, updaters: list[Control]) -> torch.Tensor:
        x = params[self.adapter.latent_arg]
        cond = frame.layout.rows("cond")
        scale = self._input_scale(params.get("timestep", 0))
        z = (x[cond] / scale).detach()
        update = LatentUpdate(self, params, cond, scale, z, frame)
        delta = torch.zeros_like(z)
        for control in updaters:
            with torch.enable_grad():  # pipelines run under no_grad; a control's loss needs its graph
                change = control.update_latents(update)
            if change is not None:
                delta = delta + change.detach()
                update.z = z + delta
        self._pending = (frame.step.index, delta, scale)
        return x + scale * delta[list(frame.layout.samples)].to(x.dtype)

    def _step(self, *args, **kwargs):
        if self._pending is not None:
            delta = self._pending[1]
            self._pending = None
            args, kwargs = self._add_to_sample(args, kwargs, delta)
        result = self._scheduler_step(*args, **kwargs)
        if self._last_step is None:
            return result
        # After-step hook: controls may change the new latents (e.g. an edit's local blend).
        sample = result[0] if isinstance(result, tuple) else result.prev_sample
        changed = False
        for control in self.controls:
            new = control.after_step(self._last_step, sample)
            if new is not None:
                sample, changed = new, True
        if not changed:
            return result
        if isinstance(result, tuple):
            return (sample,) + tuple(result[1:])
        result.prev_sample = sample
        return result

    @staticmethod
    def _add_to_sample(args: tuple, kwargs: dict, delta: torch.Tensor) -> tuple[tuple, dict]:
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

    # -- called by the interceptors (attnctl.intercept) ---------------------------------------------
    def attention_call(self, site: Site, q, k, v, *, text: slice | None, image: slice, bias=None):
        """An ``AttentionCall`` after the site's controls edited it, or None when no control hooks this site.
        q/k/v: (B, H, S, D). (``attention_calls`` counts module calls; the site's forward wrapper adds them.)"""
        hooks = self.hooks.get(site.name)
        if not hooks or self.frame is None:
            return None
        call = AttentionCall(self, site, q, k, v, text, image, bias)
        for control, heads in hooks:
            call.heads = heads
            control.on_attention(call)
        call.heads = None
        return call


def _dressed_as(original, fn):
    """A function calling ``fn`` that looks like ``original`` to ``inspect.signature`` (and carries its name and
    docstring): pipelines decide which arguments to pass by reading the signature of what they call."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    wrapper.__signature__ = inspect.signature(original)  # a bound method's: no ``self``
    return wrapper


@contextlib.contextmanager
def apply(pipe, controls: Control | Iterable[Control] = (), *, backend: str | None = None,
          share_prefix: bool = True) -> Iterator[Session]:
    """Run ``controls`` inside every call of ``pipe`` made in this block::

        with attnctl.apply(pipe, [attnctl.controls.maps.Maps(words=["cat"])]) as session:
            image = pipe("a cat").images[0]
        session.last_run()  # per-call diagnostics

    Works with the text-to-image and img2img pipelines of SD1.x/2.x, SDXL, SD3/3.5 and FLUX. Everything is
    restored on exit, also when the block raises. An extra branch's rows (PAG's perturbed rows) join the batch
    at the first denoiser block where a control acts (``share_prefix``; False runs them through every block).
    """
    if isinstance(controls, Control):
        controls = [controls]
    session = Session(pipe, controls, backend=backend, share_prefix=share_prefix)
    session.install()
    try:
        yield session
    finally:
        session.uninstall()
