"""Batch layouts: what each row of a denoiser call is, decided from what the call is, never guessed.

A pipeline calls its denoiser in a few known ways. Each way is a *kind* with one function here that lays out
its rows; an adapter declares the kinds its pipelines make (``Adapter.layout_kinds``) and says which kind a
given call is (``Adapter.call_kind``), from facts about the call gathered in a ``DenoiserCall``. The engine
asks for the kind, then for the layout, and never branches on the family.

Kinds (``rows`` = the call's batch size, ``n`` = the number of images the pipeline call generates):

``cfg_batch``     CFG in one batch (SD1.x/2.x, SDXL, SD3 with ``guidance_scale > 1``): ``n`` uncond rows, then
                  ``n`` cond rows, or the reverse where the adapter declares it (``Adapter.cfg_order``: Z-Image
                  runs [cond; uncond]). Extra branches (PAG's perturbed rows) and latent updates act here.
``cond_batch``    every row conditional: a pipeline without CFG, FLUX's main call. Extra branches act here.
``uncond_call``   every row unconditional, in a call of its own: FLUX's true CFG (a negative prompt and
                  ``true_cfg_scale > 1``). No extra branch; the rows take the guidance delta the step's cond
                  rows took (``attnctl.engine.guidance``), so ``neg + t (cond - neg)`` gains it exactly once.
``skip_layers``   SD3's skip-layer guidance (``skip_guidance_layers``): a second call at the step on the cond
                  latents alone, with ``skip_layers=`` passed to the transformer. Its rows are the branch
                  ``skip``; no extra branch, no fold of its own. They take the delta the step's cond rows took,
                  so the pipeline's ``(cond - skip) * slg_scale`` does not see PAG at all.
``uncond_call`` and ``cond_batch`` are also the calls of diffusers' guiders in modular pipelines: a
                  ``ClassifierFreeGuidance`` guider runs one call per prediction, ``pred_cond`` then
                  ``pred_uncond``; the prediction a call is for is read from the guider (``guider_prediction``),
                  and a prediction of no known role (PAG's or skip-layer guidance's ``pred_cond_skip``, ...) is
                  a ``LayoutError``.
``outside``       the denoiser called outside a pipeline call (no ``encode_prompt`` opened one): every row cond.

A call that fits none of these is a ``LayoutError`` naming the denoiser, its row count and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import LayoutError

CFG_BATCH = "cfg_batch"
COND_BATCH = "cond_batch"
UNCOND_CALL = "uncond_call"
SKIP_LAYERS = "skip_layers"
OUTSIDE = "outside"

# Kinds whose cond rows may get extra branches, latent updates and the guidance fold.
GUIDED_KINDS = frozenset({CFG_BATCH, COND_BATCH, OUTSIDE})
# Kinds whose rows the pipeline combines with the cond rows of the step's guided call, so that they take the
# same guidance delta the cond rows took (the difference the pipeline forms then does not contain it).
FOLLOWER_KINDS = frozenset({UNCOND_CALL, SKIP_LAYERS})


@dataclass(frozen=True)
class BatchLayout:
    """What each row of a denoiser batch is: its branch (``uncond``, ``cond``, ``skip`` or an extra branch such
    as ``perturb``) and its sample (the index of the image being generated, prompt-major as pipelines order
    them); ``kind``: the kind of call it was laid out for (see the module docstring)."""

    branches: tuple[str, ...]
    samples: tuple[int, ...]
    kind: str = COND_BATCH

    def rows(self, branch: str) -> list[int]:
        return [i for i, b in enumerate(self.branches) if b == branch]

    def has(self, branch: str) -> bool:
        return branch in self.branches

    @property
    def n_samples(self) -> int:
        return max(self.samples) + 1 if self.samples else 0

    def __len__(self) -> int:
        return len(self.branches)


@dataclass(frozen=True)
class DenoiserCall:
    """What the engine knows about one denoiser call before running it.

    ``denoiser``: the denoiser's class name; ``rows``: the batch size of its latents (B of (B, C, H, W) or
    (B, S, C)); ``params``: its arguments by name; ``in_pipeline``: whether a pipeline call is open (its
    ``encode_prompt`` ran and it has not ended); ``cfg``: the running pipeline's ``do_classifier_free_guidance``
    (None when the pipeline has no such property); ``context``: the name of the denoiser's open
    ``cache_context`` (FLUX: ``"cond"``/``"uncond"``), None outside one; ``text_source``: which
    ``encode_prompt`` call of this pipeline call produced the call's text embeddings (0 = the prompt, 1 = the
    second one: FLUX's negative prompt), None when they match none; ``samples``: the number of images the
    pipeline call generates when its prompts are known, else None; ``guider``: the class name of the diffusers
    guider that prepared this call (modular pipelines), and ``guider_prediction`` the prediction it is for
    (``pred_cond``, ``pred_uncond``, ...), None without a guider; ``cfg_order``: the branches of a CFG batch's
    two halves in order (the adapter's ``cfg_order``: ``("uncond", "cond")`` for diffusers' usual
    ``torch.cat([negative, positive])``).
    """

    denoiser: str
    rows: int
    params: dict[str, Any] = field(repr=False, default_factory=dict)
    in_pipeline: bool = False
    cfg: bool | None = None
    context: str | None = None
    text_source: int | None = None
    samples: int | None = None
    guider: str | None = None
    guider_prediction: str | None = None
    cfg_order: tuple[str, str] = ("uncond", "cond")

    def describe(self) -> str:
        return f"{self.denoiser} call with {self.rows} row{'s' if self.rows != 1 else ''}"


def _same(branch: str, rows: int, kind: str) -> BatchLayout:
    return BatchLayout((branch,) * rows, tuple(range(rows)), kind)


def _check_samples(call: DenoiserCall, kind: str, expected: int) -> None:
    """Rows must be what the pipeline call's prompts imply (when they are known): a wrong count means the call
    is not of this kind (a diffusers PAG pipeline's [uncond; cond; perturbed] batch, a custom loop)."""
    if call.rows != expected:
        raise LayoutError(f"{call.describe()}: layout {kind!r} expects {expected} rows "
                          f"({call.samples} image(s) of this pipeline call); attnctl cannot tell which row is "
                          "which, so it applies no guess: call the pipeline in a supported way or the denoiser "
                          "outside a pipeline call")


def cfg_batch(call: DenoiserCall) -> BatchLayout:
    """CFG in one batch: rows (2n, ...) = [uncond x n; cond x n], sample i at rows i and n + i (diffusers'
    ``torch.cat([negative, positive])``), or [cond x n; uncond x n] where ``call.cfg_order`` says so. An odd row
    count is a ``LayoutError``."""
    first, second = call.cfg_order
    if call.rows % 2:
        raise LayoutError(f"{call.describe()}: layout {CFG_BATCH!r} (the pipeline runs classifier-free guidance "
                          f"in one batch) expects an even number of rows, [{first} x n; {second} x n]; an odd "
                          "batch is not a layout attnctl knows (a diffusers PAG pipeline's own perturbed rows?)")
    if call.samples is not None:
        _check_samples(call, CFG_BATCH, 2 * call.samples)
    half = call.rows // 2
    return BatchLayout((first,) * half + (second,) * half, tuple(range(half)) * 2, CFG_BATCH)


def cond_batch(call: DenoiserCall) -> BatchLayout:
    """No CFG in the batch: rows (n, ...) all conditional, row i = sample i."""
    if call.samples is not None:
        _check_samples(call, COND_BATCH, call.samples)
    return _same("cond", call.rows, COND_BATCH)


def uncond_call(call: DenoiserCall) -> BatchLayout:
    """The separate unconditional call of true CFG (FLUX): rows (n, ...) all unconditional."""
    if call.samples is not None:
        _check_samples(call, UNCOND_CALL, call.samples)
    return _same("uncond", call.rows, UNCOND_CALL)


def skip_layers(call: DenoiserCall) -> BatchLayout:
    """SD3's skip-layer-guidance call: rows (n, ...) on the cond latents and prompt with layers skipped, branch
    ``skip``. Controls keyed on ``cond`` (maps, PAG's extra rows, latent updates) do not act on it."""
    if call.samples is not None:
        _check_samples(call, SKIP_LAYERS, call.samples)
    return _same("skip", call.rows, SKIP_LAYERS)


def outside(call: DenoiserCall) -> BatchLayout:
    """The denoiser called outside a pipeline call: every row conditional (the caller owns any guidance)."""
    return _same("cond", call.rows, OUTSIDE)


# The roles of a diffusers guider's predictions (modular pipelines), by the guider's prediction name.
GUIDER_KINDS = {"pred_cond": COND_BATCH, "pred_uncond": UNCOND_CALL}


def guider_kind(call: DenoiserCall) -> str:
    """The kind of a call a diffusers guider prepared, from the prediction it is for; a ``LayoutError`` for a
    prediction of no known role."""
    if call.guider_prediction not in GUIDER_KINDS:
        raise LayoutError(f"{call.describe()} prepared by the {call.guider} guider for prediction "
                          f"{call.guider_prediction!r}: attnctl knows the roles of {', '.join(GUIDER_KINDS)} only "
                          "(ClassifierFreeGuidance); use that guider, or no guider-made rows under a control")
    return GUIDER_KINDS[call.guider_prediction]


LAYOUTS = {
    CFG_BATCH: cfg_batch,
    COND_BATCH: cond_batch,
    UNCOND_CALL: uncond_call,
    SKIP_LAYERS: skip_layers,
    OUTSIDE: outside,
}


def layout_for(kind: str, call: DenoiserCall, allowed: tuple[str, ...]) -> BatchLayout:
    """The layout of ``call`` as ``kind``, which must be one of the adapter's declared kinds ``allowed``."""
    if kind not in allowed or kind not in LAYOUTS:
        raise LayoutError(f"{call.describe()}: layout {kind!r} is not one this pipeline family makes "
                          f"(allowed: {', '.join(allowed)})")
    return LAYOUTS[kind](call)


def true_cfg_kind(call: DenoiserCall) -> str:
    """The kind of a call of a pipeline that runs CFG as a second call at the same step (FLUX's and Qwen-Image's
    true CFG): a diffusers guider's prediction where a guider prepared the call; else the pipeline's
    ``transformer.cache_context("cond" | "uncond")``; else the call's text embeddings, the prompt's (the first
    ``encode_prompt`` result of the pipeline call) being cond and the negative prompt's (the second) uncond.
    Anything else is a ``LayoutError``."""
    if call.guider is not None:
        return guider_kind(call)
    if not call.in_pipeline:
        return OUTSIDE
    by_context = {"cond": COND_BATCH, "uncond": UNCOND_CALL}
    if call.context is not None:
        if call.context not in by_context:
            raise LayoutError(f"{call.describe()} in cache_context {call.context!r}: allowed contexts are "
                              "'cond' and 'uncond'")
        return by_context[call.context]
    by_source = {0: COND_BATCH, 1: UNCOND_CALL}
    if call.text_source not in by_source:
        raise LayoutError(f"{call.describe()}: its encoder_hidden_states are neither the prompt's nor the "
                          "negative prompt's embeddings from this pipeline call's encode_prompt, and no "
                          "cache_context names it; expected a cond call or a true-CFG uncond call")
    return by_source[call.text_source]
