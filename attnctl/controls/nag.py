"""``nag``: Normalized Attention Guidance, a negative prompt that acts inside attention (no CFG needed).

Chen et al., "Normalized Attention Guidance: Universal Negative Guidance for Diffusion Models" (arXiv
2505.21179; official code ChenDarYen/Normalized-Attention-Guidance, ``src/attention_flux_nag.py``). At every
selected text-reading attention layer the image queries attend twice: to the prompt's text (output Z+) and to
the negative prompt's text (Z-), with the same image keys and values. Per image token (the norm runs over the
channels of all heads together, as in the official code's (B, S, H*D) tensors)::

    Z~ = Z+ + s (Z+ - Z-)                        extrapolate away from the negative text
    r  = ||Z~|| / ||Z+||;  Z^ = Z~ * min(r, tau) / r   cap the feature's growth at tau
    Z  = alpha Z^ + (1 - alpha) Z+                blend back towards the positive features

``scale`` s here is the official code's ``nag_scale`` minus one (it writes ``Z+ * nag_scale - Z- *
(nag_scale - 1)``), so s = 0 is no guidance. Defaults are the official code's: ``nag_scale`` 5 (s = 4),
``nag_tau`` 2.5, ``nag_alpha`` 0.25, ``nag_end`` 1.0 (guidance over the whole schedule). The paper writes the
norm as L1 (``norm: l1``, the default); the released code uses L2 (``norm: l2`` reproduces it).

Where the negative text comes from:

- UNet cross-attention (SD1.x/2.x, SDXL) reads the same text embeddings in every layer, so the negative
  prompt's keys/values are the layer's own projections of its embeddings (one small extra attention per layer).
- MM-DiT (SD3/3.5 joint attention; FLUX, FLUX.2 and Chroma double- and single-stream blocks; Qwen-Image's
  double-stream blocks; Z-Image's single-stream main layers) updates the text tokens block by block, so the negative
  prompt's tokens run as a second text stream beside the first, on the guided rows, as if each block ran on
  [negative stream; the call's own image stream] with its image output discarded (as the official code does, where
  the negative rows' image tokens are overwritten). Only the text side of that is computed (``Adapter.text_pass``):
  every step of a block but attention is per token, and the image tokens' keys and values are the call's own, so
  before each block the negative text's queries/keys/values come from the block's own modules (its text modulation,
  projections, norms, rotary embedding), and in the block's attention call the negative keys/values replace the text
  span: the image queries' output is Z-, the text queries' output goes through the block's text output path
  (``to_add_out``, gated residual, text MLP; a single-stream block's shared MLP and ``proj_out`` on the text tokens
  only) to give the stream for the next block. On CPU the guided rows' attention is computed here, once for Z+ and
  Z-: the image queries' scores over the image keys (the largest part) are shared, each output merged from the
  image-key and text-key parts by their log-sum-exp. The stream advances up to the last block holding a selected
  layer (that block's text output is never read). Where text tokens carry no position inside the blocks (SD3:
  ``text_positionless``), identical negative-text tokens stay identical, so the stream carries one of each, counted
  as keys as often as it stands for (a pipeline without T5 has 256 identical zero tokens of 333). A block the
  adapter cannot split (another block class, a processor it does not know, fused projections) runs whole once more
  instead (``text_only = False``: every block, the reference).
  The adapter describes the stream (``Adapter.start_text``, ``attnctl.adapters.base.SecondText``) and where it sits
  in a block's input: beside the image stream (``encoder_hidden_states``), or joined with it where a single-stream
  block takes [text; image] (FLUX.2, Chroma) or [image; text] (Z-Image), split at the call's own text. The negative
  text's padding is masked as the pipeline masks a prompt's (Chroma: its own float mask over [text; image], as
  ChromaPipeline builds one, 1 on the real tokens and the first pad token; Qwen-Image: a key mask; Z-Image: the
  batch padding between negatives of different lengths). Qwen-Image and Z-Image keep the negative text at its own
  length (``Adapter.text_own_length``), with its own positions: Qwen-Image's text RoPE for that length beside the
  call's image grids; Z-Image's caption refiner runs on it (text only, once per denoiser call) and in the main
  layers its positions are shifted to end where the call's own caption ends, right before the image tokens, so image
  and negative caption stand as in a call of the negative prompt (exactly so unless the image has padding tokens,
  whose position is 0). FLUX.2's reference-image tokens are image-side keys, their queries unguided. Qwen-Image-Edit
  is refused: its text stream holds the input image's vision tokens, which a negative text encoded alone lacks.
  Differences from the official code: the negative stream is modulated by the call's own pooled text embedding, not
  the negative prompt's (FLUX; FLUX.2, Chroma, Qwen-Image and Z-Image modulate by the timestep alone); the official
  code runs FLUX's single-stream blocks on whole [negative text; image] rows and carries the stream through every
  block.

Only the conditional rows are guided (the prompt's own; with CFG the unconditional rows stay as they are, and
rows of extra branches such as PAG's perturbed ones are left alone). The negative prompt is encoded once per
pipeline call by the pipeline's own text encoders and template, through its ``encode_prompt`` (SD3's three
encoders, FLUX's two, FLUX.2's Mistral or Qwen3 chat turn, Chroma's T5, Qwen-Image's Qwen2.5-VL template,
Z-Image's Qwen3 chat turn), at the call's text length (Qwen-Image, Z-Image: at its own).
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from ..adapters.base import RowList, SecondText
from ..errors import ControlError
from ..layouts import BatchLayout
from ..select import select
from .base import Control, StepWindow, StrictOptions, register

TEXT_KINDS = ("cross", "joint", "single")


def normalized_guidance(positive: torch.Tensor, negative: torch.Tensor, scale: float, tau: float, alpha: float,
                        norm: str = "l1", channel_dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """NAG's combination of attention outputs (see the module docstring); same shape as ``positive``.

    ``positive``/``negative``: Z+ and Z-, any layout whose ``channel_dims`` hold one token's features, e.g.
    (B, S, C) with ``(-1,)`` or (B, H, S, D) with ``(1, 3)`` (all heads together). A token whose Z+ is all zero
    takes Z~ unscaled (its ratio is undefined; the official code divides by zero there).
    """
    p = 1 if norm == "l1" else 2
    guided = positive + scale * (positive - negative)
    norm_pos = torch.linalg.vector_norm(positive, ord=p, dim=channel_dims, keepdim=True)
    norm_guided = torch.linalg.vector_norm(guided, ord=p, dim=channel_dims, keepdim=True)
    ratio = norm_guided / norm_pos
    factor = torch.where(ratio > tau, tau / ratio, torch.ones_like(ratio))
    factor = torch.where(norm_pos > 0, factor, torch.ones_like(ratio))
    return alpha * (guided * factor) + (1 - alpha) * positive


def _as_bias(mask: torch.Tensor, dtype) -> torch.Tensor:
    """An attention mask as a bias added to the scores: a boolean one (True: may attend) as 0 / -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _query_rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The query rows ``rows`` of a mask broadcastable to (B, H, S_q, S_k) (all of it where it is per key)."""
    return mask if mask is None or mask.shape[-2] == 1 else mask[..., rows, :]


def _moved(part: slice, text: slice, span: slice) -> slice:
    """Where ``part`` of a call's sequence (outside its text span ``text``) sits once ``span`` replaces that span."""
    shift = span.stop - text.stop if part.start >= text.stop else 0
    return slice(part.start + shift, part.stop + shift)


def _negative_keys(k: torch.Tensor, v: torch.Tensor, split, text: slice, log_counts: torch.Tensor | None):
    """Keys and values (B, H, S', D) of a call with the negative text's (``split``) in place of its text span,
    that span in them, and the additive mask of a call laid out so (broadcastable to (B, H, S', S')): the
    negative text's own (``split.mask``, e.g. its padding) and, where its tokens stand for several identical
    ones (``log_counts``), the log of each one's count on its key; None: neither."""
    k = torch.cat([k[:, :, : text.start], split.k.to(k.dtype), k[:, :, text.stop:]], dim=2)
    v = torch.cat([v[:, :, : text.start], split.v.to(v.dtype), v[:, :, text.stop:]], dim=2)
    span = slice(text.start, text.start + split.k.shape[2])
    mask = None
    if log_counts is not None:
        mask = torch.zeros(k.shape[2], dtype=k.dtype, device=k.device)
        mask[span] = log_counts.to(k.dtype)
        mask = mask[None, None, None, :]
    if split.mask is not None:
        own = _as_bias(split.mask, k.dtype)
        mask = own if mask is None else mask + own
    return k, v, span, mask


def _shares_image_keys(split, text: slice) -> bool:
    """Whether the negative text's attention reads the call's other keys unmasked, with a mask (if any) per key:
    then the image queries' scores over them can be shared with the call's own attention."""
    mask = split.mask
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.shape[-2] != 1:
        return False
    span = slice(text.start, text.start + split.k.shape[2])
    return bool(mask[..., : span.start].all()) and bool(mask[..., span.stop:].all())


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D) + bias) v (B, H, Sq, D) and the log-sum-exp of those scores (B, H, Sq); ``bias``
    per key, (Sk,) or (B or 1, 1, 1, Sk), or None. PyTorch's CPU flash kernel, which returns both (no bias, a
    CPU tensor of a dtype it takes), else in chunks of 1024 queries."""
    if bias is None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                               torch.float16):
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
            return out, lse
        except (RuntimeError, AttributeError):  # a torch without the kernel
            pass
    dtype = torch.promote_types(q.dtype, torch.float32)
    outs, lses = [], []
    for start in range(0, q.shape[2], 1024):
        scores = (q[:, :, start:start + 1024].to(dtype) @ k.to(dtype).transpose(-1, -2)) * q.shape[-1] ** -0.5
        if bias is not None:
            scores = scores + bias.to(dtype)
        lse = torch.logsumexp(scores, dim=-1)
        outs.append((torch.exp(scores - lse[..., None]) @ v.to(dtype)).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _identical_tokens(stream: torch.Tensor):
    """Where the negative stream (B, S, C) holds identical tokens (in every row; e.g. SD3's 256 T5 tokens, all
    zeros, in a pipeline without T5): (one token per group (U,), in order; each token's group (S,); log of
    each group's size (U,)), else None. In blocks without text positions identical tokens stay identical (their
    every step is the same), so the stream carries one of each, and as keys each counts as many times as it
    stands for (+log count on its scores: the same softmax)."""
    flat = stream.transpose(0, 1).reshape(stream.shape[1], -1)
    _, group, counts = torch.unique(flat, dim=0, return_inverse=True, return_counts=True)
    if len(counts) == stream.shape[1]:
        return None
    positions = torch.arange(stream.shape[1], device=stream.device)
    first = torch.full((len(counts),), stream.shape[1], device=stream.device).scatter_reduce(0, group, positions,
                                                                                              "amin")
    order = torch.argsort(first)  # groups in the order of their first token
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return first[order], rank[group], counts[order].to(stream.dtype).log()


def _merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The attention output over keys A and B together from each part's (output, log-sum-exp)."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a, weight_b = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    return (weight_a * out_a.to(weight_a.dtype) + weight_b * out_b.to(weight_b.dtype)).to(out_a.dtype)


class NagOptions(StrictOptions):
    negative_prompt: str | list[str] = Field(description="What the image should not show: one text for every "
                                                         "prompt, or a list with one per prompt.")
    scale: float = Field(4.0, ge=0.0, le=100.0, description="s in Z+ + s (Z+ - Z-); 0 = off (official "
                                                             "nag_scale 5 = s 4).")
    tau: float = Field(2.5, gt=1.0, le=100.0, description="Cap on ||Z|| / ||Z+|| per token (official: 2.5); "
                                                          "must be > 1.")
    alpha: float = Field(0.25, ge=0.0, le=1.0, description="Blend alpha Z + (1 - alpha) Z+ (official: 0.25).")
    norm: Literal["l1", "l2"] = Field("l1", description="Norm of the cap: l1 as in the paper, l2 as in the "
                                                        "official code.")
    window: StepWindow = Field(default_factory=StepWindow, description="Fraction of the schedule to guide "
                                                                       "(official nag_end 1.0: all of it).")
    layers: list[str] | None = Field(None, description="Layer selectors among the text-reading layers (cross, "
                                                       "joint, single); default: all of them.")

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("give a negative prompt (or a list with one per prompt), e.g. 'blue'")
        for text in texts:
            if not text.strip():
                raise ValueError("an empty negative prompt guides towards nothing in particular; give the concept "
                                 "the image should not show, e.g. 'blue' or 'square'")
        return value

    @field_validator("layers", mode="before")
    @classmethod
    def _listify(cls, value):
        from .base import listify

        return listify(value)


@register
class Nag(Control):
    """Normalized Attention Guidance; see the module docstring."""

    name = "nag"
    Options = NagOptions
    families = ("sd15", "sdxl", "sd3", "flux", "flux2", "chroma", "qwenimage", "zimage")

    @property
    def active(self) -> bool:
        opts = self.options
        return opts.scale > 0 and opts.window.stop > opts.window.start

    # False: the negative stream runs through whole blocks (image tokens included), the reference the text-only
    # pass (``Adapter.text_pass``) is tested against; blocks the adapter cannot split always run whole.
    text_only: ClassVar[bool] = True

    def bind(self, session):
        self._session = session
        self._hooked_blocks = False
        self._calls = 0
        if not self.active:
            return {}
        sites = select(session.sites, self.options.layers, kinds=TEXT_KINDS)
        self._modules = {site.name: module for site, module in session.site_modules if site.name in sites}
        self._guided = set(sites)
        self._blocks: list[tuple[str, torch.nn.Module, str | None]] = []  # (block, module, its text site)
        adapter = session.adapter
        if not adapter.text_stream:
            return sites
        why = adapter.second_text_unsupported(session.pipe)
        if why:
            raise ControlError(f"control 'nag' cannot run on {type(session.pipe).__name__}: {why}")
        # MM-DiT: the blocks that carry text, up to the last one holding a selected layer; their text sites are
        # hooked too (unguided ones only advance the negative stream, with the call's own image keys/values).
        text_sites = [site.name for site in session.sites if site.kind in TEXT_KINDS]
        blocks = adapter.text_blocks(session.denoiser)

        def site_in(name):
            inside = [s for s in text_sites if s.startswith(name + ".")]
            return inside[0] if len(inside) == 1 else None

        last = max(i for i, (name, _) in enumerate(blocks) if any(s.startswith(name + ".") for s in sites))
        self._blocks = [(name, module, site_in(name)) for name, module in blocks[: last + 1]]
        stream_sites = {site: None for _, _, site in self._blocks if site is not None and site not in sites}
        return {**sites, **stream_sites}

    # -- per pipeline call ---------------------------------------------------------------------------------
    def on_call_start(self, session):
        # (negative texts, text_len, device, dtype) -> (embeddings, mask of their real tokens)
        self._embeds: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._captured: dict[str, torch.Tensor] = {}
        self._capturing = False
        self._text: SecondText | None = None  # the negative text stream before the next block
        self._share: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # see _identical_tokens
        self._passes: dict[str, tuple] = {}  # site -> (TextPass, whether the stream advances) for its block
        self._calls = 0
        self.block_passes = {"text": 0, "block": 0}  # negative-stream passes: text side only / whole block
        self.attention_pairs = 0  # query-key pairs the negative text's attentions add (text-only passes)
        self.shared_calls = 0  # guided calls whose image keys' scores Z+ and Z- shared
        if not self.active:
            return
        negatives = self.options.negative_prompt
        if isinstance(negatives, list) and session.prompts is not None and len(negatives) not in (1, len(
                session.prompts)):
            raise ControlError(f"control 'nag': negative_prompt has {len(negatives)} entries for "
                               f"{len(session.prompts)} prompts; give one text, or one per prompt")
        if session.adapter.text_stream and not self._hooked_blocks:
            self._hook_blocks(session)

    def on_call_end(self, session):
        if not self._calls:
            return {}
        record = {"layer_calls": self._calls, "negative_prompt": self.options.negative_prompt}
        if any(self.block_passes.values()):
            record["negative_stream"] = dict(self.block_passes, attention_pairs=self.attention_pairs,
                                             shared_calls=self.shared_calls)
        return record

    def _negative_of(self, session, sample: int) -> str:
        negatives = self.options.negative_prompt
        if isinstance(negatives, str):
            return negatives
        if len(negatives) == 1:
            return negatives[0]
        return negatives[min(sample // session.images_per_prompt, len(negatives) - 1)]

    def _negative_embeds(self, session, samples: tuple[int, ...], like) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The negative prompt's text embeddings for ``samples`` (len(samples), S, C) like the call's text ``like``
        (a tensor, or a ``RowList`` of per-row texts), and the (len(samples), S) mask of their real tokens (None:
        all real)."""
        texts = tuple(self._negative_of(session, s) for s in samples)
        first = like[0] if isinstance(like, RowList) else like
        text_len = None if isinstance(like, RowList) else like.shape[1]
        key = (texts, text_len, first.device, first.dtype)
        if key not in self._embeds:
            adapter = session.adapter
            distinct = sorted(set(texts))
            encoded = adapter.encode_text(session.pipe, distinct, text_len, first.device, first.dtype)
            embeds, mask = encoded if isinstance(encoded, tuple) else (encoded, None)
            if not adapter.text_own_length and embeds.shape[1] != text_len:
                raise ControlError(f"control 'nag': the negative prompt encodes to {embeds.shape[1]} text tokens, "
                                   f"the prompt to {text_len}; they must match")
            index = torch.as_tensor([distinct.index(t) for t in texts], device=embeds.device)
            embeds = embeds[index]
            if mask is not None:
                mask = mask[index.to(mask.device)]
                mask = None if bool(mask.all()) else mask
            self._embeds[key] = (embeds, mask)
        return self._embeds[key]

    # -- MM-DiT: the negative text stream ----------------------------------------------------------------------
    def _hook_blocks(self, session) -> None:
        """A pre-hook on every block that carries text, up to the last one holding a selected layer."""
        last = len(self._blocks) - 1
        for index, (_, module, site) in enumerate(self._blocks):
            signature = inspect.signature(module.forward)

            def negative_pass(module, args, kwargs, index=index, site=site, signature=signature):
                self._negative_pass(session, module, index, index == last, site, signature, args, kwargs)

            handle = module.register_forward_pre_hook(negative_pass, with_kwargs=True)
            session.on_exit(handle.remove)
        self._hooked_blocks = True

    def _negative_pass(self, session, module, index: int, is_last: bool, site: str | None, signature, args,
                       kwargs) -> None:
        """Before block ``index``: the negative stream's side of it on the guided rows. Where the adapter splits
        the block (``text_pass``), only the negative text's queries/keys/values here; its attention and the
        stream's update happen in the block's own attention call (``_text_attention``) with that call's image
        keys/values. Otherwise the whole block runs once more on [negative stream; image stream]
        (``Adapter.with_text``)."""
        frame = session.frame
        if frame is None or not self.options.window.contains(frame.step.progress):
            return
        cond = frame.layout.rows("cond")
        if not cond:
            return
        adapter = session.adapter
        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        if index == 0:
            self._passes.clear()
            samples = tuple(frame.layout.samples[r] for r in cond)
            embeds, mask = self._negative_embeds(session, samples, frame.params[adapter.text_arg])
            text = adapter.start_text(session.denoiser, embeds, mask, frame.params, cond)
            self._share = None
            if self.text_only and adapter.text_positionless and text.mask is None:
                self._share = _identical_tokens(text.tokens)
                if self._share is not None:
                    text = replace(text, tokens=text.tokens[:, self._share[0]])
            self._text = text
        if self._text is None:
            return
        skip = adapter.block_unbatched_args
        for name, value in arguments.items():
            if name in skip:
                continue
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == len(frame.layout):
                arguments[name] = value[cond]
        if self.text_only and site is not None:
            split = adapter.text_pass(module, self._text, arguments)
            if split is not None:
                self._passes[site] = (split, not is_last)
                self.block_passes["text"] += 1
                return
        self.block_passes["block"] += 1
        share = self._share
        whole = self._text if share is None else replace(self._text, tokens=self._text.tokens[:, share[1]])
        arguments = adapter.with_text(module, arguments, whole)
        narrow = replace(frame, layout=BatchLayout(("cond",) * len(cond), tuple(frame.layout.samples[r] for r in cond),
                                                    frame.layout.kind))
        hooks = session.hooks
        session.frame, self._capturing = narrow, True
        # Only this control sees the negative pass: other controls' edits are about the prompt's own text.
        session.hooks = {site: [(c, h) for c, h in entries if c is self] for site, entries in hooks.items()}
        try:
            out = module.forward(**arguments)
        finally:
            session.frame, session.hooks, self._capturing = frame, hooks, False
        tokens = adapter.text_after(module, out, whole)
        if tokens is not None and share is not None:
            tokens = tokens[:, share[0]]
        self._text = None if tokens is None else replace(self._text, tokens=tokens)

    def _text_attention(self, call, split, advance: bool, cond: list[int], guided: bool):
        """The negative text's side of an attention call, on its own: keys/values are the call's own on the guided
        rows with the text span holding the negative text's; returns (Z-: the image queries' output where
        ``guided``, the text queries' output where ``advance``). One attention over the queries needed."""
        text, image = call.text, call.image
        rows = torch.as_tensor(cond, device=call.q.device)
        k, v, span, mask = _negative_keys(call.k[rows], call.v[rows], split, text, self._log_counts)
        image_at = _moved(image, text, span)
        negative = negative_text = None
        if guided and advance and self._log_counts is None:  # one call: the call's queries, its text span replaced
            q = torch.cat([call.q[rows][:, :, : text.start], split.q.to(k.dtype), call.q[rows][:, :, text.stop:]], 2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            self.attention_pairs += q.shape[0] * q.shape[2] * k.shape[2]
            return out[:, :, image_at], out[:, :, span]
        if guided:
            q = call.q[rows][:, :, image]
            negative = F.scaled_dot_product_attention(q, k, v, attn_mask=_query_rows(mask, image_at))
            self.attention_pairs += q.shape[0] * q.shape[2] * k.shape[2]
        if advance:
            negative_text = F.scaled_dot_product_attention(split.q.to(k.dtype), k, v,
                                                           attn_mask=_query_rows(mask, span))
            self.attention_pairs += split.q.shape[0] * split.q.shape[2] * k.shape[2]
        return negative, negative_text

    def _shared_attention(self, q, k, v, split, text: slice, image: slice, advance: bool, shared: dict):
        """The guided rows' attention (``AttentionCall.take_rows``) together with the negative text's: the image
        queries' scores over the image keys, the largest part, are computed once for Z+ and Z- (each softmax
        over [image; text] keys is that part's output and log-sum-exp merged with the text keys' part: the same
        softmax, rounded differently). The text queries (the prompt's, and the negative text's where
        ``advance``) attend in one batched call. Puts Z- and the negative text's output in ``shared``. Only where
        the negative text's mask (if any) is per key and leaves the other keys alone (``_shares_image_keys``)."""
        n = q.shape[0]
        k_neg, v_neg, span, mask = _negative_keys(k, v, split, text, self._log_counts)
        q_image = q[:, :, image]
        own = _attention_lse(q_image, k[:, :, image], v[:, :, image])
        z_plus = _merge(own, _attention_lse(q_image, k[:, :, text], v[:, :, text]))
        shared["image"] = _merge(own, _attention_lse(q_image, split.k.to(k.dtype), split.v.to(v.dtype),
                                                     None if mask is None else mask[..., span]))
        out = q.new_empty(q.shape[:3] + v.shape[3:])
        out[:, :, image] = z_plus.to(out.dtype)
        if advance and (mask is not None or k_neg.shape[2] != k.shape[2]):  # fewer, more or masked keys: apart
            out[:, :, text] = F.scaled_dot_product_attention(q[:, :, text], k, v)
            shared["text"] = F.scaled_dot_product_attention(split.q.to(q.dtype), k_neg, v_neg, attn_mask=mask)
        elif advance:
            both = F.scaled_dot_product_attention(torch.cat([q[:, :, text], split.q.to(q.dtype)]),
                                                  torch.cat([k, k_neg]), torch.cat([v, v_neg]))
            out[:, :, text], shared["text"] = both[:n], both[n:]
        else:
            out[:, :, text] = F.scaled_dot_product_attention(q[:, :, text], k, v)
        n_keys, n_image, n_text = k_neg.shape[2], q_image.shape[2], split.k.shape[2]
        self.attention_pairs += n * (n_image * n_text + (n_text * n_keys if advance else 0))  # beyond Z+'s own
        return out

    # -- per attention call ---------------------------------------------------------------------------------
    def on_attention(self, call):
        opts = self.options
        if not opts.window.contains(call.step.progress) or call.text is None:
            return
        image = call.image
        site = call.site.name
        if self._capturing:
            if site in self._guided:
                call.then(lambda out: self._capture(site, out, image))
            return
        cond = call.layout.rows("cond")
        if not cond:
            return
        if site in self._passes:
            split, advance = self._passes.pop(site)
            text = call.text
            if self._share is not None:
                expected = len(self._share[0])
            elif call.session.adapter.text_own_length:  # the negative text keeps its own length
                expected = self._text.tokens.shape[1]
            else:
                expected = text.stop - text.start
            if split.k.shape[2] != expected:
                raise ControlError(f"control 'nag': the negative text has {split.k.shape[2]} tokens at {site}, "
                                   f"expected {expected}")
            self._text_side(call, split, advance and split.finish is not None, cond, site in self._guided)
            return
        elif site not in self._guided:  # advances the stream only; its block ran whole
            return
        elif call.session.adapter.text_stream:
            negative = self._captured.pop(site, None)
            if negative is None:
                raise ControlError(f"control 'nag': no negative-prompt attention was computed for {site} at this "
                                   "step; its block did not run the negative text stream")
        else:
            samples = tuple(call.layout.samples[r] for r in cond)
            positive = call.frame.params[call.session.adapter.text_arg]
            embeds = self._negative_embeds(call.session, samples, positive if not isinstance(positive, tuple)
                                           else positive[0])[0]
            key, value = call.session.adapter.project_text(self._modules[site], embeds)
            negative = F.scaled_dot_product_attention(call.q[cond], key.to(call.q.dtype), value.to(call.q.dtype))
        self._calls += 1
        call.then(lambda out: self._guide(out, negative, cond, image))

    @property
    def _log_counts(self) -> torch.Tensor | None:
        return None if self._share is None else self._share[2]

    def _text_side(self, call, split, advance: bool, cond: list[int], guided: bool) -> None:
        """Where the block was split: the negative text's attention in this call, the stream's update (``advance``)
        and, at a guided site, the guidance. On CPU, at a guided site whose [image; text] keys are all the call
        has, the guided rows' attention is computed here (``take_rows``) sharing the image keys' part with Z-."""
        text, image = call.text, call.image
        shared: dict[str, torch.Tensor] = {}
        whole = (text.stop - text.start) + (image.stop - image.start) == call.q.shape[2] == call.k.shape[2]
        if guided and whole and call.q.device.type == "cpu" and _shares_image_keys(split, text):
            call.take_rows(cond, lambda q, k, v: self._shared_attention(q, k, v, split, text, image, advance, shared))
        if guided:
            self._calls += 1

        def after(out):
            if shared:
                negative, negative_text = shared["image"], shared.get("text")
                self.shared_calls += 1
            else:  # the backend computed the guided rows (another control changed them, or not on CPU)
                negative, negative_text = self._text_attention(call, split, advance, cond, guided)
            if advance:
                self._text = replace(self._text, tokens=split.finish(negative_text))
            return self._guide(out, negative, cond, image) if guided else out

        call.then(after)

    def _capture(self, site: str, out: torch.Tensor, image: slice) -> torch.Tensor:
        self._captured[site] = out[:, :, image]
        return out

    def _guide(self, out: torch.Tensor, negative: torch.Tensor, cond: list[int], image: slice) -> torch.Tensor:
        """``out`` (B, H, Sq, D) with the cond rows' image queries guided by ``negative`` (n_cond, H, S_img, D)."""
        opts = self.options
        out = out.clone()
        rows = torch.as_tensor(cond, device=out.device)
        positive = out[rows][:, :, image]
        if negative.shape != positive.shape:
            raise ControlError(f"control 'nag': negative attention output {tuple(negative.shape)} does not match "
                               f"the prompt's {tuple(positive.shape)}")
        guided = normalized_guidance(positive, negative.to(positive.dtype), opts.scale, opts.tau, opts.alpha,
                                     opts.norm, channel_dims=(1, 3))
        block = out[rows]
        block[:, :, image] = guided
        out[rows] = block
        return out
