"""Where controls meet attention: at the attention primitive, inside each module's own processor.

attnctl never replaces an attention processor. The one installed on each module (diffusers' own, IP-Adapter's,
a LoRA-aware one, a user's subclass) stays installed and runs: its projections, norms, RoPE, IP-Adapter branch.
What attnctl intercepts is the attention computation that processor calls:

* ``torch.nn.functional.scaled_dot_product_attention`` (``AttnProcessor2_0``, ``IPAdapterAttnProcessor2_0``,
  ``JointAttnProcessor2_0``, ...), through a ``TorchFunctionMode`` entered only around the processor call of a
  module some control hooks. It sees SDPA wherever the processor's code lives and under whatever name it was
  imported (the mechanism diffusers' own layer-skip hooks use).
* diffusers' ``dispatch_attention_fn`` (FLUX and newer processors), by replacing that name in the modules where
  the processor's class and its bases look it up (``module_globals["dispatch_attention_fn"]``). The replacement
  passes every call straight through to the original whenever no controlled site is active, so the backend the
  user chose (``set_attention_backend``, a processor's ``_attention_backend``) is untouched. It is installed once
  per module name however many sessions need it (reference counted) and removed when the last one leaves.

Which module is running lives in a ``ContextVar`` (``_ACTIVE``), set by a thin wrapper around the attention
module's ``forward`` (an instance attribute, restored on exit; ``module.processor``, ``attn_processors`` and a
user's ``set_attn_processor`` keep working). A context variable is per thread and per task, so nothing leaks
between calls, threads or pipelines. A module no control hooks sets nothing: its calls go to the user's function
unchanged, without even the mode's overhead.

Inside a hooked module, the adapter's ``CallPlan`` for the processor says which primitive call a control sees
(the first; IP-Adapter's later image-prompt calls pass through) and how many calls may follow; the adapter's
``tokens`` says where text and image tokens sit in that call, checked against the call's sequence lengths.
Whatever attnctl cannot place (no interceptable call while a control wants to act, more calls than declared,
lengths that do not match, options the engine cannot honour) is a ``ProcessorError`` naming the module, the
processor class and the call: never a silent guess.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import sys
import threading
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import ProcessorError

_SDPA = F.scaled_dot_product_attention
_SDPA_SIGNATURE = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None
)


@dataclass(frozen=True)
class Tokens:
    """Where the tokens sit in a controlled call: ``text`` span of the keys (None: no text), ``image`` span of the
    queries, and the query/key sequence lengths the call must have for those spans to be right."""

    text: slice | None
    image: slice
    q_len: int
    k_len: int


@dataclass(frozen=True)
class CallPlan:
    """How a processor calls the attention primitive: the index of the call a control sees, and how many calls
    one processor call may make (None: any number; the ones after ``controlled`` pass through untouched)."""

    controlled: int = 0
    max_calls: int | None = 1
    note: str = "one attention call"


class SiteCall:
    """One call of a hooked attention module's processor: the state the interceptors read."""

    def __init__(self, session, site, module, inputs: dict):
        self.session, self.site, self.module, self.inputs = session, site, module, inputs
        self.processor = module.processor
        self.plan: CallPlan = session.adapter.call_plan(self.processor)
        self.calls = 0
        self.busy = False  # inside a primitive we handle: nested primitive calls (ours, the backend's) pass through

    def where(self, index: int | None = None) -> str:
        call = "" if index is None else f", attention call #{index + 1}"
        return f"{self.site.name} (processor {type(self.processor).__name__}{call})"

    def passthrough(self, fn, *args, **kwargs):
        """Run the original primitive unchanged (nested primitive calls inside it are not counted)."""
        self.busy = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.busy = False

    def intercept(self, fn, args: tuple, kwargs: dict, q, k, v, bias, heads_dim: int, options: dict):
        """One primitive call. q/k/v have heads at dim ``heads_dim``: 1 for SDPA's (B, H, S, D), 2 for dispatch's
        (B, S, H, D). Returns the primitive's output in the caller's layout: the control's, or the original's."""
        index, self.calls = self.calls, self.calls + 1
        plan = self.plan
        if index != plan.controlled:
            if plan.max_calls is not None and index >= plan.max_calls:
                raise ProcessorError(
                    f"{self.where(index)} makes more attention calls than attnctl knows for it ({plan.note}), so "
                    "it cannot tell which tokens this call carries. Leave this layer out of the control's layers "
                    "or use a processor attnctl knows."
                )
            return self.passthrough(fn, *args, **kwargs)
        session = self.session
        if session.frame is None:
            return self.passthrough(fn, *args, **kwargs)
        if heads_dim == 2:
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        tokens = session.adapter.tokens(self.site, self.inputs, session.frame)
        if q.shape[2] != tokens.q_len or k.shape[2] != tokens.k_len:
            raise ProcessorError(
                f"{self.where(index)} attends {q.shape[2]} queries to {k.shape[2]} keys, but the "
                f"{session.family} adapter places the tokens of a {self.site.kind} layer with {tokens.q_len} "
                f"queries and {tokens.k_len} keys here; attnctl cannot tell which tokens this call carries"
            )
        self._check_options(index, q, options)
        self.busy = True  # the controls and the engine's own attention may call SDPA: not the processor's calls
        try:
            call = session.attention_call(self.site, q, k, v, text=tokens.text, image=tokens.image, bias=bias)
            out = fn(*args, **kwargs) if call is None else call.compute()
        finally:
            self.busy = False
        if call is None:
            return out
        return out.transpose(1, 2) if heads_dim == 2 else out

    def _check_options(self, index: int, q, options: dict) -> None:
        """The engine computes softmax(q k^T / sqrt(D) + bias) v: any other option of the call cannot be honoured."""
        scale = options.get("scale")
        bad = []
        if options.get("dropout_p", 0.0):
            bad.append(f"dropout_p={options['dropout_p']}")
        if options.get("is_causal", False):
            bad.append("is_causal=True")
        if options.get("enable_gqa", False):
            bad.append("enable_gqa=True")
        if scale is not None and not math.isclose(scale, 1.0 / math.sqrt(q.shape[-1]), rel_tol=1e-6):
            bad.append(f"scale={scale}")
        if options.get("attention_kwargs"):
            bad.append(f"attention_kwargs={sorted(options['attention_kwargs'])}")
        if options.get("parallel_config") is not None:
            bad.append("parallel_config (context parallelism)")
        if bad:
            raise ProcessorError(f"{self.where(index)} calls attention with {', '.join(bad)}, which attnctl's "
                                 "controls cannot honour; leave this layer out of the control's layers")

    def finish(self) -> None:
        """After the processor returned: a control wanted to act but the processor made no call we could see."""
        if self.calls == 0 and self.session.frame is not None:
            raise ProcessorError(
                f"{self.where()} computed attention without calling torch's scaled_dot_product_attention or "
                "diffusers' dispatch_attention_fn, so attnctl's controls cannot act on it. Leave this layer out of "
                "the control's layers, or use a processor that calls one of them (e.g. AttnProcessor2_0)."
            )


_ACTIVE: ContextVar[SiteCall | None] = ContextVar("attnctl_site", default=None)


class _SDPAMode(TorchFunctionMode):
    """Routes ``scaled_dot_product_attention`` calls of the active site to it; every other op runs as is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = _ACTIVE.get()
        if func is not _SDPA or state is None or state.busy:
            return func(*args, **kwargs)
        bound = _SDPA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        return state.intercept(func, args, kwargs, a["query"], a["key"], a["value"], a["attn_mask"], 1, a)


# -- the dispatch_attention_fn patch (process-wide, reference counted) --------------------------------------
_PATCH_LOCK = threading.Lock()
_PATCHES: dict[tuple[str, str], list] = {}  # (module name, global name) -> [original, wrapper, users]


def _original_dispatch():
    try:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
    except ImportError:  # an older diffusers without the dispatcher: nothing to patch
        return None
    return dispatch_attention_fn


def _wrap_dispatch(original):
    """A stand-in for ``dispatch_attention_fn``: the original, unless a hooked site is active (B, S, H, D)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def dispatch_attention_fn(*args, **kwargs):
        state = _ACTIVE.get()
        if state is None or state.busy:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        return state.intercept(original, args, kwargs, a["query"], a["key"], a["value"], a["attn_mask"], 2, a)

    dispatch_attention_fn._attnctl_original = original
    return dispatch_attention_fn


def patch_dispatch(processor_class: type) -> list:
    """Patch ``dispatch_attention_fn`` in the modules of ``processor_class`` and its bases; returns an undo list
    (one callable per patch this call took a reference on)."""
    original = _original_dispatch()
    if original is None:
        return []
    undo = []
    for cls in processor_class.__mro__:
        module = sys.modules.get(cls.__module__)
        if module is None or cls is object:
            continue
        for name, value in list(vars(module).items()):
            if value is original or getattr(value, "_attnctl_original", None) is original:
                undo.append(_take_patch(module.__name__, name, original))
    return undo


def _take_patch(module_name: str, name: str, original):
    with _PATCH_LOCK:
        entry = _PATCHES.get((module_name, name))
        if entry is None:
            wrapper = _wrap_dispatch(original)
            setattr(importlib.import_module(module_name), name, wrapper)
            entry = _PATCHES[(module_name, name)] = [original, wrapper, 0]
        entry[2] += 1

    def release():
        with _PATCH_LOCK:
            entry[2] -= 1
            if entry[2] == 0:
                del _PATCHES[(module_name, name)]
                module = sys.modules.get(module_name)
                if module is not None and getattr(module, name, None) is entry[1]:
                    setattr(module, name, entry[0])

    return release


# -- the per-module wrapper -----------------------------------------------------------------------------------
def _module_inputs(args: tuple, kwargs: dict) -> dict:
    """``hidden_states`` and ``encoder_hidden_states`` of an attention module call (positional or keyword)."""
    inputs = {name: kwargs.get(name) for name in ("hidden_states", "encoder_hidden_states")}
    if args:
        inputs["hidden_states"] = args[0]
    if len(args) > 1:
        inputs["encoder_hidden_states"] = args[1]
    return inputs


def wrap_forward(session, site, module, original_forward):
    """``module.forward`` that counts the call and, where a control hooks the site, activates it around the
    processor call: the ContextVar for the interceptors and the SDPA mode (both exited however the call ends)."""

    def forward(*args, **kwargs):
        if not torch.compiler.is_compiling():  # a traced counter would be a guard: a recompile per call
            session.attention_calls += 1
        if site.name not in session.hooks:
            return original_forward(*args, **kwargs)
        session.ensure_patched(type(module.processor))  # a processor set inside the block is patched too
        state = SiteCall(session, site, module, _module_inputs(args, kwargs))
        token = _ACTIVE.set(state)
        try:
            with _SDPAMode():
                out = original_forward(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)
        state.finish()
        return out

    forward._attnctl_wrapped = original_forward
    return forward


__all__ = ["CallPlan", "SiteCall", "Tokens", "patch_dispatch", "wrap_forward"]
