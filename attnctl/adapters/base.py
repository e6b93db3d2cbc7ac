"""What every architecture adapter provides, and the description of one attention layer.

An adapter says *where* attention lives in a family (which modules, where text and image tokens sit in the
attention call each module's processor makes, which processors make several calls and which one a control
sees, how the batch is laid out); controls say *what* to do and never branch on the family. The processors
themselves are never replaced: ``attnctl.intercept`` catches their call to the attention primitive. Adding a
family is one file in this folder plus one registry line in ``__init__``.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import layouts
from ..errors import LayoutError, ModelError
from ..intercept import CallPlan, Tokens

KINDS = ("self", "cross", "joint", "single")


@dataclass
class TextPass:
    """A block's text side for a second text stream (``Adapter.text_pass``).

    ``q``, ``k``, ``v``: (B, H, S_text, D), the text tokens' queries, keys and values as the block's attention
    call sees them; ``finish(out)``: the stream after the block from the text queries' attention output
    ``out`` (B, H, S_text, D) over the call's keys with these text keys in the text span (None: the block
    returns no text stream, e.g. SD3's last block).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    finish: Callable[[torch.Tensor], torch.Tensor] | None
    # The attention mask the block's processor would pass with these text tokens in the call's text span (bool:
    # True = may attend, or a float added to the scores), broadcastable to (B, H, S_q, S_k) of that call, whose
    # queries and keys are laid out as the call's own with its text span replaced; None: no mask.
    mask: torch.Tensor | None = None


@dataclass
class SecondText:
    """A second text stream beside a denoiser call's own (the ``nag`` control's negative prompt), on some of its
    rows (``Adapter.start_text``).

    ``tokens``: (B, S, C), the stream before the next block; ``mask``: (B, S) bool, True where a token is real (a
    key attention may read), None: every token is; ``rope``: the stream's own rotary embedding where the adapter
    computes one (its length or positions differ from the call's text: Qwen-Image, Z-Image), None: the call's text
    positions; ``joined``: where the call's own text sits in the sequence a joined (single-stream) block takes
    (FLUX.2, Chroma: the first T tokens; Z-Image: after the padded image), None: no block takes it joined.
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    rope: Any = None
    joined: slice | None = None


@dataclass(frozen=True)
class Site:
    """One attention module of a denoiser.

    ``kind``: ``self`` (image tokens attend to image tokens), ``cross`` (image queries, text keys: UNet attn2),
    ``joint`` (MM-DiT double-stream block: one sequence of image and text tokens, separate projections),
    ``single`` (FLUX single-stream block: the joined sequence through shared projections).
    """

    name: str
    kind: str
    heads: int
    head_dim: int
    index: int

    @property
    def has_text(self) -> bool:
        return self.kind != "self"


@dataclass(frozen=True)
class TextSegment:
    """Text-encoder tokens that appear in the attention's text span, starting at ``offset`` within it."""

    tokenizer: object
    offset: int
    max_length: int


class RowList(list):
    """A call argument with one item per row whose items may differ in shape (Z-Image's caption features: one
    (L_i, C) tensor per row). An adapter's ``to_batch`` marks such arguments; the engine's ``take_rows`` picks
    their items like a batch-major tensor's rows."""


def n_tokens(hidden_states: torch.Tensor) -> int:
    """Sequence length of a module input: (B, S, C) -> S; a (B, C, H, W) feature map -> H * W."""
    if hidden_states.ndim == 4:
        return int(hidden_states.shape[2] * hidden_states.shape[3])
    return int(hidden_states.shape[1])


def import_path(path: str):
    """The object at ``"package.module:Name"``."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class Adapter:
    """Base class: one subclass per family (``unet``: SD1.x/2.x and SDXL, ``sd3``, ``flux``)."""

    family: str = ""
    denoiser_attr: str = ""
    latent_arg: str = ""
    text_arg: str = "encoder_hidden_states"
    unbatched_args: frozenset[str] = frozenset()
    timestep_arg: str = "timestep"
    timestep_scale: float = 1.0  # the pipeline passes timestep / scale to the denoiser (FLUX: t / 1000)
    timestep_offset: float = 0.0  # the scheduler's timestep = offset + scale * the denoiser's (Z-Image: 1000, -1000)
    # Declarations the discovery methods below read ("module:Class" paths, imported when first needed).
    denoiser_class: str = ""  # the pipeline's denoiser that identifies the family
    attention_class: str = "diffusers.models.attention_processor:Attention"
    # Processors (and their subclasses) that make more than one attention call per module call, with the plan
    # saying which call a control sees; any other processor is expected to make exactly one.
    call_plans: tuple[tuple[str, CallPlan], ...] = ()
    # The denoiser's blocks in the order its forward runs them (attribute names: a module list or one module),
    # the modules after them that still take per-sample inputs, the block arguments that are not batch-major,
    # and the forward arguments (extra residuals added between blocks) under which rows cannot join late.
    # The engine uses them to run an extra branch's rows only from the first block that treats them apart.
    block_attrs: tuple[str, ...] = ()
    tail_attrs: tuple[str, ...] = ()
    block_unbatched_args: frozenset[str] = frozenset()
    late_rows_blockers: frozenset[str] = frozenset()
    # Why ``attnctl.inversion`` cannot invert a real image in this family ("" = it can): said by the inversion
    # error and by recipe validation of an ``edit`` with ``image:``. What inversion needs of a family is declared
    # in the "real images" section below.
    inversion_unsupported: str = ""
    # Real images (``attnctl.inversion``): the scheduler steps on ``velocity_sign`` times the denoiser's output
    # (Z-Image's pipeline negates it); the latent grid is ``latent_patch`` x ``latent_patch`` VAE pixels per
    # token (2 where latents are packed or patchified into 2x2 tokens); ``native_pixels`` is the default image
    # side where the pipeline declares no ``default_sample_size`` and its denoiser no ``sample_size``.
    velocity_sign: float = 1.0
    latent_patch: int = 1
    native_pixels: int | None = None

    # -- discovery -------------------------------------------------------------------------------------------
    @classmethod
    def matches(cls, pipe) -> bool:
        """Whether ``pipe``'s denoiser (``denoiser_attr``) is an instance of ``denoiser_class``."""
        return isinstance(getattr(pipe, cls.denoiser_attr, None), import_path(cls.denoiser_class))

    @classmethod
    def matches_index(cls, index: dict) -> bool:
        """Whether a saved pipeline's ``model_index.json`` (``index``) names this family's denoiser class as its
        ``denoiser_attr`` component: the family of a folder before any weights load."""
        entry = index.get(cls.denoiser_attr)
        return (isinstance(entry, list) and len(entry) == 2
                and entry[1] == cls.denoiser_class.rpartition(":")[2])

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def module_class(self) -> type:
        """The attention module class of this family."""
        return import_path(self.attention_class)

    def kind_of(self, module) -> str:
        raise NotImplementedError

    def sites(self, denoiser: torch.nn.Module) -> list[tuple[Site, torch.nn.Module]]:
        """Every attention module of ``denoiser`` in model order, described as a ``Site``."""
        cls, found = self.module_class(), []
        for name, module in denoiser.named_modules():
            if isinstance(module, cls):
                head_dim = module.to_q.out_features // module.heads
                found.append((Site(name, self.kind_of(module), module.heads, head_dim, len(found)), module))
        return found

    def blocks(self, denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """``(name, module)`` of the denoiser's blocks in execution order, then its ``tail_attrs`` modules."""
        found = []
        for attr in self.block_attrs + self.tail_attrs:
            module = getattr(denoiser, attr, None)
            if isinstance(module, torch.nn.ModuleList):
                found += [(f"{attr}.{i}", child) for i, child in enumerate(module)]
            elif isinstance(module, torch.nn.Module):
                found.append((attr, module))
        return found

    # -- the attention call inside a module's processor ------------------------------------------------
    def call_plan(self, processor) -> CallPlan:
        """Which of ``processor``'s attention calls a control sees, and how many it may make."""
        for path, plan in self.call_plans:
            try:
                cls = import_path(path)
            except (ImportError, AttributeError):  # an older diffusers without this processor
                continue
            if isinstance(processor, cls):
                return plan
        return CallPlan()

    def tokens(self, site: Site, inputs: dict, frame) -> Tokens:
        """Where text and image tokens sit in the controlled attention call of ``site``.

        ``inputs``: the module call's ``hidden_states`` and ``encoder_hidden_states`` (either may be None);
        ``frame``: the engine's current denoiser call (its ``text_len``). The returned lengths are checked
        against the intercepted call's q/k sequence lengths.
        """
        raise NotImplementedError

    # -- per denoiser call ---------------------------------------------------------------------------------
    def latent_hw(self, params: dict) -> tuple[int, int]:
        """Height and width of the latent grid the denoiser sees (in its own tokens/pixels)."""
        raise NotImplementedError

    def reference_grids(self, params: dict) -> list[tuple[int, int]]:
        """(h, w) token grids of the reference images a denoiser call with ``params`` carries after the generated
        image's tokens (FLUX.2 ``image=[...]``, Qwen-Image-Edit); none in most families."""
        return []

    def image_grid(self, latent_hw: tuple[int, int], n_image_tokens: int) -> tuple[int, int]:
        """(h, w) of the image tokens at a layer with ``n_image_tokens`` tokens, for any aspect ratio."""
        height, width = latent_hw
        factor = 1
        while factor <= 64:
            h, w = math.ceil(height / factor), math.ceil(width / factor)
            if h * w == n_image_tokens:
                return h, w
            factor *= 2
        raise ModelError(
            f"cannot place {n_image_tokens} image tokens on a grid for latents of {height}x{width} ({self.family})"
        )

    def text_segments(self, pipe) -> list[TextSegment]:
        raise NotImplementedError

    def unsupported_call(self, pipe, params: dict) -> str | None:
        """Why a denoiser call of ``pipe`` with ``params`` cannot run under any control (the engine raises it as a
        ``ModelError`` at that call, before the denoiser runs, when a control is applied), or None: it can. Calls
        with no control applied always run as the pipeline makes them."""
        return None

    # -- a second text (a negative prompt) inside attention (the ``nag`` control) -------------------------------
    # ``False``: every text-reading layer reads the same text embeddings (UNet cross-attention), so a second
    # text's keys/values are one projection per layer (``project_text``). ``True``: the text tokens are a stream
    # the blocks update (MM-DiT), so a second text must run through the blocks beside the first (``start_text``
    # gives the stream's start; the blocks of ``text_blocks`` carry it).
    text_stream: bool = False
    # ``True``: inside the blocks text tokens carry no position (no rotary embedding on them), so identical text
    # tokens stay identical through every block and a second text stream may carry one of each.
    text_positionless: bool = False
    # ``True``: a second text keeps its own length (``encode_text`` ignores ``text_len``; the stream's positions
    # come with it, ``SecondText.rope``). ``False``: it is padded or truncated to the call's text length.
    text_own_length: bool = False

    def second_text_unsupported(self, pipe) -> str:
        """Why a second text cannot run beside the prompt's on ``pipe`` ("" = it can): said by the ``nag``
        control when it is applied."""
        return ""

    def encode_text(self, pipe, prompts: list[str], text_len: int | None, device, dtype):
        """``prompts`` encoded by the pipeline's own text encoders (its ``encode_prompt``, its template) into what
        the denoiser's ``text_arg`` takes: (len(prompts), S, C), padded or truncated to the call's ``text_len``
        tokens like the call's own prompt (``text_own_length``: at their own length, S the longest), or that and
        a (len(prompts), S) bool mask of the real tokens (None: all real)."""
        raise NotImplementedError

    def project_text(self, module, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, D) of ``text`` (B, S, C) at attention module ``module``, as its processor
        computes them from ``encoder_hidden_states`` (only where ``text_stream`` is False)."""
        raise NotImplementedError

    def embed_text(self, denoiser, text: torch.Tensor) -> torch.Tensor:
        """The text stream at the first block for ``text`` (B, S, C) (only where ``text_stream`` is True)."""
        raise NotImplementedError

    def start_text(self, denoiser, text: torch.Tensor, mask: torch.Tensor | None, params: dict,
                   rows: list[int]) -> SecondText:
        """The second text stream at the first block of ``text_blocks`` for ``text`` (B, S, C) from
        ``encode_text`` (``mask``: its real tokens, or None), beside the rows ``rows`` of a denoiser call with
        ``params`` (the engine's batch view). By default the stream is ``embed_text``'s."""
        return SecondText(self.embed_text(denoiser, text), mask)

    def text_blocks(self, denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """``(name, module)`` of the blocks that carry the text stream, in execution order (only where
        ``text_stream`` is True): by default those of ``block_attrs`` whose forward takes
        ``encoder_hidden_states``."""
        return [(name, module) for name, module in self.blocks(denoiser)
                if name.split(".")[0] in self.block_attrs
                and "encoder_hidden_states" in inspect.signature(module.forward).parameters]

    def with_text(self, block, inputs: dict, text: SecondText) -> dict:
        """The forward arguments of ``block`` (``inputs``: the call's own, on the rows of ``text``) with the second
        text in place of the call's own text: the block run whole on [``text``; the call's image tokens]."""
        return dict(inputs, encoder_hidden_states=text.tokens)

    def text_after(self, block, out, text: SecondText) -> torch.Tensor | None:
        """The second text's stream after ``block`` from what ``block`` returned when run on ``with_text``'s
        arguments (None: the block returns no text stream, e.g. SD3's last block)."""
        return out[0] if isinstance(out, tuple) else None

    # -- the call as the engine sees it: one batch ------------------------------------------------------------
    # The engine works on a batch view of each denoiser call: ``latent_arg`` one batch-major tensor (B, ...), every
    # per-row argument batch-major (a tensor, or a ``RowList`` of items that differ in shape)
    # and the noise prediction one (B, ...) tensor. Every family but Z-Image passes and returns exactly that, so
    # these are identities; Z-Image's transformer takes and returns Python lists with one tensor per row.
    def to_batch(self, params: dict) -> dict:
        """The denoiser call's arguments (by name) in the engine's batch view."""
        return params

    def from_batch(self, params: dict) -> dict:
        """``to_batch``'s inverse: the arguments the denoiser takes."""
        return params

    def sample_to_batch(self, sample):
        """The denoiser's noise prediction (what ``attnctl.engine.rows.get_sample`` finds) as one (B, ...) tensor."""
        return sample

    def sample_from_batch(self, sample: torch.Tensor):
        """``sample_to_batch``'s inverse: the prediction in the form the denoiser returns it."""
        return sample

    # Pipeline methods every call of this family's pipelines runs before its first denoiser call, even when it
    # skips ``check_inputs``/``encode_prompt`` (Z-Image's pipelines, given ``prompt_embeds`` without a prompt): the
    # engine starts a pipeline call there if none is open (its prompts then unknown).
    call_start_methods: tuple[str, ...] = ()

    def text_pass(self, block, text: SecondText, inputs: dict) -> TextPass | None:
        """The text side of ``block`` for a second text stream ``text`` (its ``tokens`` (B, S_text, C)) (only
        where ``text_stream`` is True): its text tokens' queries, keys and values at the block's text-reading
        attention module, as that module's processor computes them (norms, modulation by ``inputs``' timestep
        embedding, rotary embedding), the call's attention mask with them in its text span, and how the text
        queries' attention output becomes the stream after the block. ``inputs``: the block's forward arguments
        for the rows of ``text``. Every step is per token except attention, so with the image tokens' keys and
        values of the block's own call this is exactly the block run on [``text``; the call's image tokens]
        (``with_text``), without the image tokens' update. None where the block (or its processor) is not one
        this adapter knows how to split: run the whole block."""
        return None

    # -- real images (attnctl.inversion) ----------------------------------------------------------------------
    # How the family's pipelines turn the VAE's latents into what their ``latents=`` argument takes, and back.
    # ``denormalize_latents`` is what the pipeline does between its denoising loop and ``vae.decode``;
    # ``normalize_latents`` is its exact inverse, so an encoded image is a latent the pipeline would decode to it.
    # The base class is Stable Diffusion's and SD3's: ``z / scaling_factor + shift_factor`` before decoding.
    def normalize_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents (the posterior mean ``vae.encode`` gives) -> the pipeline's ``latents=`` format."""
        config = pipe.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents - shift) * config.scaling_factor

    def denormalize_latents(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``normalize_latents``' inverse, as the pipeline computes it before ``vae.decode`` (``height``/``width``:
        the image in pixels, for families whose latents are packed into tokens)."""
        config = pipe.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return latents / config.scaling_factor + shift

    def encode_image(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] (the VAE's device and dtype) -> latents in the pipeline's ``latents=``
        format: the posterior mean of ``vae.encode``, normalised."""
        return self.normalize_latents(pipe, pipe.vae.encode(pixels).latent_dist.mean)

    def decode_latents(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents in the pipeline's ``latents=`` format -> images (B, 3, H, W) in [-1, 1], by the pipeline's
        decode path (``denormalize_latents``, then ``vae.decode``)."""
        return pipe.vae.decode(self.denormalize_latents(pipe, latents, height, width), return_dict=False)[0]

    def pack_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's ``latents=`` format -> the denoiser's ``latent_arg`` in the engine's batch view (what the
        pipeline passes its denoiser for those latents; the identity where the two are the same)."""
        return latents

    def unpack_latents(self, pipe, packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``pack_latents``' inverse; ``like``: a tensor in the ``latents=`` format with the wanted shape."""
        return packed

    def inversion_guidance(self, pipe, guidance_scale: float) -> float | None:
        """The ``guidance_scale`` argument under which the pipeline's denoiser calls give the conditional prediction
        alone (inversion follows it): 1.0 turns CFG off in most pipelines; a guidance-distilled model keeps the
        scale, which its denoiser takes as an input."""
        return 1.0

    def negative_prompt_args(self, pipe, negatives: list[str], call_kwargs: dict) -> dict | None:
        """Pipeline-call arguments that give row i the negative prompt ``negatives[i]`` (inversion's negative-prompt
        fix; ``call_kwargs``: the call's other arguments), or None where the pipeline runs no CFG for it to act on."""
        return {"negative_prompt": negatives}

    # -- batch layout (attnctl.layouts) ----------------------------------------------------------------
    # The branches of a CFG batch's two halves, in order (``attnctl.layouts.cfg_batch``).
    cfg_order: tuple[str, str] = ("uncond", "cond")
    # The kinds of denoiser call this family's pipelines make. UNet pipelines: CFG in one batch, or no CFG.
    # A diffusers guider (modular pipelines) runs the uncond prediction as a call of its own.
    layout_kinds: tuple[str, ...] = (layouts.CFG_BATCH, layouts.COND_BATCH, layouts.UNCOND_CALL, layouts.OUTSIDE)

    def call_kind(self, call: layouts.DenoiserCall) -> str:
        """Which kind of call ``call`` is, from what the pipeline is doing: a call a diffusers guider prepared
        has its guider prediction's kind (``attnctl.layouts.guider_kind``); outside a pipeline call every row is
        cond; inside one, the running pipeline's ``do_classifier_free_guidance`` says whether its batch is
        [uncond; cond]. A pipeline without that property is a ``LayoutError``, not a guess."""
        if call.guider is not None:  # a modular pipeline: the guider says which prediction the call is for
            return layouts.guider_kind(call)
        if not call.in_pipeline:
            return layouts.OUTSIDE
        if call.cfg is None:
            raise LayoutError(f"{call.describe()} inside a pipeline without `do_classifier_free_guidance`: "
                              f"the {self.family} layouts ({', '.join(self.layout_kinds)}) need it to tell "
                              "uncond rows from cond rows")
        return layouts.CFG_BATCH if call.cfg else layouts.COND_BATCH
