"""Row layout of a denoiser call: what each row is, and taking rows out of a call's arguments and outputs.

``describe_call`` gathers the facts a layout is decided from (``attnctl.layouts.DenoiserCall``) and
``layout_of`` asks the adapter which kind of call it is and ``attnctl.layouts`` for its rows; nothing here
guesses. ``Frame`` is one denoiser call as the rest of the engine sees it (its step, layout and the geometry
every attention call shares). ``take_rows`` indexes the batch-major tensors of a call's (nested) arguments, so
extra rows can be copied from the cond rows; ``get_sample`` / ``with_sample`` read and replace the noise
prediction in whatever a denoiser returns (a tensor, a tuple, an output dataclass).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.base import RowList
from ..layouts import BatchLayout, DenoiserCall, layout_for
from .clock import StepInfo


@dataclass
class Frame:
    """One denoiser call: its step, its batch layout and the geometry every attention call shares."""

    step: StepInfo
    layout: BatchLayout
    latent_hw: tuple[int, int] | None
    text_len: int | None
    params: dict = field(repr=False, default_factory=dict)


def describe_call(pipe, adapter, denoiser, params: dict, n_rows: int, *, in_pipeline: bool,
                  encoded: list[Any], context: str | None, samples: int | None,
                  guider: tuple[str, str] | None = None) -> DenoiserCall:
    """The ``DenoiserCall`` of a call with ``params`` and ``n_rows`` rows. ``in_pipeline``: a pipeline call is
    open; ``encoded``: that call's ``encode_prompt`` results in order; ``context``: the denoiser's open
    ``cache_context`` name; ``samples``: the images the pipeline call generates, when its prompts are known;
    ``guider``: (guider class name, prediction) when a diffusers guider prepared the call (modular pipelines)."""
    text = params.get(adapter.text_arg)
    # Read only a property the pipeline class defines: inside a call it reflects that call's guidance scale.
    cfg = bool(pipe.do_classifier_free_guidance) if (
        in_pipeline and hasattr(type(pipe), "do_classifier_free_guidance")) else None
    source = None
    for i, result in enumerate(encoded):  # which encode_prompt call made these text embeddings
        first = result[0] if isinstance(result, (tuple, list)) and result else result
        if text is not None and first is text:
            source = i
            break
    name, prediction = guider if guider is not None else (None, None)
    return DenoiserCall(type(denoiser).__name__, n_rows, params, in_pipeline, cfg, context, source, samples, name,
                        prediction, tuple(adapter.cfg_order))


def layout_of(adapter, call: DenoiserCall) -> BatchLayout:
    """The adapter names the call's kind, ``attnctl.layouts`` lays out its rows (a ``LayoutError`` for a call of
    no kind the adapter declares)."""
    return layout_for(adapter.call_kind(call), call, adapter.layout_kinds)


def take_rows(value, rows: list[int], n: int, skip: Iterable[str] = (), _key: str | None = None):
    """Index every batch-major tensor (first dim ``n``) in a nested dict/list by ``rows``, and every ``RowList``
    of ``n`` items; leave the rest."""
    if _key is not None and _key in skip:
        return value
    if isinstance(value, RowList):
        if len(value) != n:
            raise ValueError(f"argument {_key or '(nested)'} has {len(value)} rows where the call has {n}")
        return RowList(value[r] for r in rows)
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
    """The noise prediction in a denoiser's output (a tensor, a tuple/list's first item, or ``.sample``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def with_sample(out, sample: torch.Tensor):
    """``out`` with its noise prediction replaced by ``sample``, in the same form."""
    if isinstance(out, torch.Tensor):
        return sample
    if isinstance(out, tuple):
        return (sample,) + tuple(out[1:])
    if isinstance(out, list):
        return [sample] + list(out[1:])
    out.sample = sample
    return out


__all__ = ["Frame", "RowList", "describe_call", "get_sample", "layout_of", "take_rows", "with_sample"]
