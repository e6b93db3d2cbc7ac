"""The session: one ``apply`` on one pipeline, and the control protocol run in every denoiser call.

``Session`` holds what an ``apply`` block knows (the pipeline, its adapter and attention sites, the controls
and which sites each hooks, the running pipeline call's prompts) and ties the engine's parts together:
``install`` puts the wrappers in place (recorded in an ``Undo`` log, ``attnctl.engine.install``),
``_forward`` is the denoiser's wrapper (the step from ``StepClock``, the rows' roles from ``rows.layout_of``,
latent updates from ``LatentUpdates``, extra branches as extra rows, joined late by ``LateRows``, and their
guidance folded by ``GuidanceFold``), and the pipeline-call boundaries (``check_inputs``, ``encode_prompt``,
``maybe_free_model_hooks``) start and end the per-call state of every control.

Everything a control or adapter reads of a session is public and documented here: ``pipe``, ``adapter``,
``family``, ``denoiser``, ``sites``, ``controls``, ``hooks``, ``frame`` (the running denoiser call),
``prompts``, ``images_per_prompt``, ``prompt_of``, ``text_positions``, ``active``, ``joined_at``, ``last_run``.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from ..adapters import adapter_for
from ..adapters.base import Site
from ..controls.base import Control
from ..errors import ControlError, ModelError, ProcessorError
from ..intercept import patch_dispatch, wrap_forward
from ..layouts import GUIDED_KINDS, BatchLayout, DenoiserCall
from ..tokens import find_phrase
from .calls import AttentionCall
from .clock import StepClock, StepInfo
from .guidance import GuidanceFold, code_globals
from .install import Undo, dressed_as
from .late_rows import LateRows
from .latents import LatentUpdates, add_to_sample
from .rows import Frame, describe_call, get_sample, layout_of, take_rows, with_sample


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
        self.frame: Frame | None = None  # the running denoiser call (None between calls)
        self.runs: list[dict] = []
        self.attention_calls = 0
        self.prompts: list[str] | None = None
        self.images_per_prompt = 1
        self.share_prefix = share_prefix
        self.forward_original = self.denoiser.forward  # the forward attnctl's wrapper calls (set on install)
        self.clock = StepClock(pipe, self.adapter.timestep_scale, self.adapter.timestep_offset)
        self.guidance = GuidanceFold(pipe)
        self.latents = LatentUpdates(self)
        self.late_rows = LateRows(self)
        self._undo = Undo()
        self._installed = False
        self._context_name: str | None = None  # the denoiser's open cache_context (FLUX: "cond" / "uncond")
        self._encoded: list[Any] = []  # this pipeline call's encode_prompt results, in order (FLUX: prompt, neg)
        self._call_open = False
        self._denoised_in_call = False
        self._token_cache: dict[tuple[str, str], list[int]] = {}
        self._call_started_at = 0.0
        self._wrapped_scheduler = None
        self._scheduler_originals: dict[int, Any] = {}
        self._last_step: StepInfo | None = None
        self._patched_classes: set[type] = set()
        self._guider_call: tuple[str, str] | None = None  # (guider, prediction) of the call a guider prepared

    # -- public state ------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether this session is installed on its pipeline now (inside its ``apply`` block)."""
        return self._installed

    @property
    def joined_at(self) -> str | None:
        """The block where an extra branch's rows joined the batch in the last pipeline call (None: they ran
        through every block, or there were none)."""
        return self.late_rows.joined_at

    _joined_at = joined_at  # the name earlier versions used

    # -- install / uninstall (attnctl.engine.install) ---------------------------------------------------------
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

    def _install(self) -> None:
        set_attr = self._undo.set_attr
        self._installed = True
        self._undo.push(lambda: setattr(self, "_installed", False))
        set_attr(self.denoiser, "_attnctl_session", self)
        for site, module in self.site_modules:
            # The module's own processor stays; its forward is wrapped to mark the site for the interceptors.
            set_attr(module, "_attnctl_session", self)
            self._undo.wrap_forward(module, lambda forward, site=site, module=module: wrap_forward(
                self, site, module, forward))
            if site.name in self.hooks:
                self.ensure_patched(type(module.processor))
        # Under an accelerate hook (model CPU offload) where there is one: the denoiser's forward without it.
        self.forward_original = self._undo.wrap_forward(self.denoiser, lambda forward: self._forward)
        self._forward_signature = inspect.signature(self.forward_original)
        self._wrap_scheduler()
        if hasattr(self.pipe, "encode_prompt"):
            self._encode_prompt = self.pipe.encode_prompt
            self._encode_signature = inspect.signature(self._encode_prompt)
            set_attr(self.pipe, "encode_prompt", self._wrapped_encode_prompt)
        if hasattr(self.pipe, "check_inputs"):
            self._check_inputs = self.pipe.check_inputs
            set_attr(self.pipe, "check_inputs", dressed_as(self._check_inputs, self._wrapped_check_inputs))
        for name in self.adapter.call_start_methods:  # calls that skip encode_prompt start here
            if hasattr(self.pipe, name):
                set_attr(self.pipe, name, dressed_as(getattr(self.pipe, name), self._call_starter(getattr(self.pipe, name))))
        if hasattr(self.pipe, "maybe_free_model_hooks"):
            self._free_hooks = self.pipe.maybe_free_model_hooks
            set_attr(self.pipe, "maybe_free_model_hooks", self._wrapped_free_hooks)
        if hasattr(self.denoiser, "cache_context"):
            self._cache_context = self.denoiser.cache_context
            set_attr(self.denoiser, "cache_context", self._wrapped_cache_context)
        self._watch_guider()
        if self.share_prefix and any(type(c).branches is not Control.branches for c in self.controls):
            self.late_rows.install(self._undo)

    def on_exit(self, undo) -> None:
        """Call ``undo()`` when the session uninstalls, also after a failed install (a control's own hooks)."""
        self._undo.push(undo)

    def _watch_guider(self) -> None:
        """A modular pipeline's diffusers guider splits each step into batches (``prepare_inputs``), each tagged
        with the prediction it is for (``pred_cond``, ``pred_uncond``, ...), then prepares the denoiser for the
        n-th batch (``prepare_models``; ``_count_prepared`` counts them from 1 at each step) before calling it.
        The call's rows take that prediction's role (``attnctl.layouts.guider_kind``); ``cleanup_models`` clears it."""
        guider = getattr(self.pipe, "guider", None)
        try:
            from diffusers.guiders import BaseGuidance
        except ImportError:  # a diffusers without guiders
            return
        if not isinstance(guider, BaseGuidance):
            return
        key = getattr(guider, "_identifier_key", "__guidance_identifier__")
        tags: list[str | None] = []

        def tagging(prepare_inputs):
            def wrapper(*args, **kwargs):
                batches = prepare_inputs(*args, **kwargs)
                tags[:] = [getattr(b, key, None) if not isinstance(b, dict) else b.get(key) for b in batches]
                return batches

            return dressed_as(prepare_inputs, wrapper)

        for name in ("prepare_inputs", "prepare_inputs_from_block_state"):
            if hasattr(guider, name):
                self._undo.set_attr(guider, name, tagging(getattr(guider, name)))
        prepare, cleanup = guider.prepare_models, guider.cleanup_models

        def prepare_models(denoiser, *args, **kwargs):
            result = prepare(denoiser, *args, **kwargs)
            index = getattr(guider, "_count_prepared", 0) - 1
            tag = tags[index] if 0 <= index < len(tags) else None
            self._guider_call = (type(guider).__name__, tag if tag is not None else f"batch #{index + 1}")
            return result

        def cleanup_models(denoiser, *args, **kwargs):
            self._guider_call = None
            return cleanup(denoiser, *args, **kwargs)

        self._undo.set_attr(guider, "prepare_models", dressed_as(prepare, prepare_models))
        self._undo.set_attr(guider, "cleanup_models", dressed_as(cleanup, cleanup_models))

        # The guider combines the step's predictions in ``forward`` and rescales (``guidance_rescale > 0``) with
        # ``rescale_noise_cfg`` of its module: while it runs, that function gets the model's own cond rows for the
        # cond rows a guidance fold shifted (``attnctl.engine.guidance``), as diffusers' PAG guider computes.
        forward = guider.forward
        namespace = code_globals(type(guider).forward)

        def guider_forward(*args, **kwargs):
            watching = self.guidance.shifted is not None and self.guidance.watch.watch(namespace)
            try:
                return forward(*args, **kwargs)
            finally:
                if watching:
                    self.guidance.watch.unwatch(namespace)

        self._undo.set_attr(guider, "forward", dressed_as(forward, guider_forward))

    def ensure_patched(self, processor_class: type) -> None:
        """Route ``processor_class``'s ``dispatch_attention_fn`` calls through attnctl (once per class and session;
        undone on exit). SDPA needs no patch: a mode sees it around hooked modules."""
        if processor_class in self._patched_classes:
            return
        self._patched_classes.add(processor_class)
        self._undo.extend(patch_dispatch(processor_class))

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
            self._undo.set_attr(scheduler, "step", dressed_as(original, self._step))
        self._scheduler_step = self._scheduler_originals[id(scheduler)]

    def uninstall(self) -> None:
        if self._call_open:
            self._end_call()
        self.guidance.release()
        errors = self._undo.undo_all()
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
        self.latents.reset()
        self.guidance.reset()
        self._context_name = None
        self._encoded = []
        self._call_open, self._denoised_in_call = True, False
        self._last_step = None
        self.late_rows.joined_at = None
        self.clock.reset()  # rebuilt from this call's timesteps (a reused tensor can keep its id and length)
        self._wrap_scheduler()
        self._call_started_at = time.perf_counter()
        for control in self.controls:
            control.on_call_start(self)

    def _end_call(self) -> None:
        self._call_open = False
        self.guidance.release()
        self._encoded = []
        record = {"seconds": time.perf_counter() - self._call_started_at, "controls": {}}
        if self.late_rows.joined_at is not None:
            record["extra_rows_from"] = self.late_rows.joined_at  # extra rows shared the blocks before this one
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
        self.latents.reset()
        self.guidance.reset()
        self._encoded = []

    def _wrapped_encode_prompt(self, *args, **kwargs):
        arguments = self._encode_signature.bind_partial(*args, **kwargs).arguments
        if not self._call_open or self._denoised_in_call:
            self._start_call(arguments.get("prompt"), arguments.get("num_images_per_prompt", 1))
        result = self._encode_prompt(*args, **kwargs)
        self._encoded.append(result)  # the denoiser calls' text embeddings are matched against these
        return result

    def _call_starter(self, method):
        """``method`` (one of the adapter's ``call_start_methods``), starting a pipeline call with unknown prompts
        when none is open or the open one already reached the denoiser (a call that skipped ``encode_prompt``)."""
        def start(*args, **kwargs):
            if not self._call_open or self._denoised_in_call:
                self._start_call(None, 1)
            return method(*args, **kwargs)

        return start

    def replace_encoded(self, before, after) -> None:
        """``encode_prompt``'s result ``before`` reaches the pipeline as ``after`` (a control rewrote it, e.g.
        interpolate's mixed encodings): denoiser calls carrying ``after``'s embeddings are matched to it."""
        for i, result in enumerate(self._encoded):
            if result is before:
                self._encoded[i] = after

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
        """The sampling step of a denoiser call given ``timestep`` (``attnctl.engine.clock``)."""
        return self.clock.step_info(timestep)

    def denoiser_call(self, params: dict, n_rows: int) -> DenoiserCall:
        """The facts a layout is decided from (``attnctl.layouts.DenoiserCall``) for a call with ``params``."""
        samples = len(self.prompts) * self.images_per_prompt if self._call_open and self.prompts else None
        return describe_call(self.pipe, self.adapter, self.denoiser, params, n_rows, in_pipeline=self._call_open,
                             encoded=self._encoded, context=self._context_name, samples=samples,
                             guider=self._guider_call)

    def layout(self, params: dict, n_rows: int) -> BatchLayout:
        """The batch layout of a denoiser call: the adapter names its kind, ``attnctl.layouts`` lays out its rows
        (a ``LayoutError`` for a call of no known kind)."""
        return layout_of(self.adapter, self.denoiser_call(params, n_rows))

    def _check_prompt_text(self) -> None:
        """A control that reads the prompt text cannot run on a pipeline without ``encode_prompt`` (diffusers'
        modular pipelines encode text in a block of their own): attnctl never sees such a call start, nor its
        prompts. An error naming the control, at the first denoiser call; prompt-free controls run."""
        if self._call_open or hasattr(self.pipe, "encode_prompt"):
            return
        needing = [c.name for c in self.controls if c.needs_prompt]
        if needing:
            names = ", ".join(repr(n) for n in needing)
            raise ControlError(
                f"control{'s' if len(needing) > 1 else ''} {names} need{'' if len(needing) > 1 else 's'} the prompt text (its words' token positions, each sample's prompt), which "
                f"attnctl reads when a pipeline call encodes its prompt (encode_prompt); {type(self.pipe).__name__} "
                "has no encode_prompt (a modular pipeline encodes text in a block of its own), so attnctl never "
                "sees a call start or its prompts there. Run this control on the standard pipeline class (e.g. "
                "StableDiffusionXLPipeline); controls that need no prompt text (perturb) run on this one")

    def _forward(self, *args, **kwargs):
        self._check_prompt_text()
        params = dict(self._forward_signature.bind(*args, **kwargs).arguments)
        extra = params.pop("kwargs", None)
        if isinstance(extra, dict):
            params.update(extra)
        adapter = self.adapter
        why = adapter.unsupported_call(self.pipe, params) if self.controls else None
        if why:  # e.g. FLUX.2 [klein] KV's cached reference keys: refused before the denoiser runs
            raise ModelError(why)
        params = adapter.to_batch(params)  # the engine's batch view (the adapter's ``to_batch``)
        x = params[adapter.latent_arg]
        n = x.shape[0]
        step = self.step_info(params.get(adapter.timestep_arg, 0))
        layout = self.layout(params, n)
        text = params.get(adapter.text_arg)
        text_len = text.shape[1] if isinstance(text, torch.Tensor) else None  # per-row texts (RowList): none
        frame = Frame(step, layout, adapter.latent_hw(params), text_len, params)
        self._denoised_in_call = True
        self._last_step = step
        guided = layout.kind in GUIDED_KINDS and layout.has("cond")  # never a follower call (see layouts)

        # Protocol kind 3: latent updates, once per step, before the step's first denoiser call.
        pending = self.latents.pending_for(step)
        if pending is not None:  # a later call at the same step (FLUX's separate uncond call)
            delta, scale = pending
            params[adapter.latent_arg] = x + scale * delta[list(layout.samples)].to(x.dtype)
        elif guided:
            updaters = [c for c in self.controls if c.wants_latent_update(step)]
            if updaters:
                params[adapter.latent_arg] = self.latents.update(params, frame, updaters)

        # Protocol kind 2: extra branches as extra rows copied from the cond rows, one batched call.
        names: list[str] = []
        guides = []
        if guided:
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
            if self.late_rows.can_join(params):
                join = self.late_rows.plan(rows, n, replace(frame, layout=wide))
            else:
                params = take_rows(params, rows, n, adapter.unbatched_args)
                frame = replace(frame, layout=wide, params=params)

        previous, self.frame = self.frame, frame
        self.late_rows.pending = join
        try:
            out = self.call_denoiser(params)
        finally:
            self.frame, self.late_rows.pending = previous, None
        if not names:
            return self._returned(self.guidance.follow(out, layout, step))
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
            base = self.guidance.fold(base, layout, step, delta)
        return self._returned(with_sample(out, base))

    def call_denoiser(self, params: dict):
        """Run the denoiser's own forward on ``params`` (the batch view); its output with the noise prediction as
        one (B, ...) tensor (the adapter's ``from_batch`` / ``sample_to_batch``)."""
        out = self.forward_original(**self.adapter.from_batch(params))
        return with_sample(out, self.adapter.sample_to_batch(get_sample(out)))

    def _returned(self, out):
        """``out`` with its noise prediction back in the form the denoiser returns it."""
        return with_sample(out, self.adapter.sample_from_batch(get_sample(out)))

    def _step(self, *args, **kwargs):
        self.guidance.release()  # the step's guidance (and its rescale) is combined: the pipeline's own again
        args, kwargs = self.latents.add_to_step(args, kwargs)
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

    _add_to_sample = staticmethod(add_to_sample)

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


__all__ = ["Session", "apply"]
