"""``regions``: put each phrase of the prompt in its own part of the image (regional prompting).

Each region is a box or a mask image bound to a phrase of the prompt; an optional ``background`` phrase is
bound to the part of the image outside every region. Two modes:

- ``hard``: a region's phrase tokens can only be attended from image queries inside the region, and (joint
  attention) the phrase's text queries only see image keys inside it. Everything else is untouched: other
  words, the start token, the end token and the padding stay visible to every query, so no query row is ever
  fully masked (a softmax over only masked scores is NaN). The last text token (end or padding) in particular
  stays visible to every query, and a phrase that would cover it is an error: in CLIP-conditioned models those
  tokens take a large share of the text attention, which masking them would push onto the remaining words.
- ``soft``: DenseDiffusion-style additive bias on the pre-softmax scores (Kim et al., "Dense Text-to-Image
  Generation with Attention Modulation", ICCV 2023, Sec. 3.2; official code: cross weight 1.0, self weight
  0.3, decay (t/1000)^5, first 30% of the steps). Raised by ``strength * (1 - area)`` inside the region,
  lowered by as much outside (smaller regions are pushed harder), times ``(t / 1000) ** decay``. With
  ``self_weight > 0`` image->image attention is modulated too: raised between tokens of one segment (a
  region, or the background = outside every region), lowered between segments. DenseDiffusion modulates
  the scores towards their row max/min, which needs every score; ours is a fixed additive bias, so it runs
  on SDPA and fused kernels.

Where: UNet cross-attention (SD1.x, SDXL), and for joint attention (SD3 [image; text], FLUX [text; image],
FLUX single-stream blocks too) the image->text and text->image blocks, text->text never. Only the conditional
rows are changed (extra branches built from them, e.g. PAG's, too); the unconditional rows are left alone,
as in DenseDiffusion.

Reference images (FLUX.2's ``image=[...]``, Qwen-Image-Edit's input image) sit after the generated image's tokens:
regions act on the generated image only, by default and always. Boxes are fractions of the generated image, and
a mask image is placed on the generated image when drawn at its aspect ratio; reference tokens belong to no
region (their queries and keys are never masked or biased). A region that would cover reference tokens is an
error at the first call that carries them: a mask drawn on a reference image (its aspect ratio) or on the
generated image and its references joined (side by side, or stacked), i.e. any mask whose aspect ratio is not
the generated image's, named by its field and file.

Overlapping regions: a token inside two regions belongs to both, so it may attend both phrases (hard) or is
raised towards both (soft). A phrase bound to two regions gets their union.

Masks: the per-token region membership (``attnctl.masks.RegionGrids``, cached per grid) is expanded to the
smallest tensor SDPA takes: (1, 1, Sq, Sk) when every controlled row has one prompt (UNet: Sq x 77, not
S x S; joint: only the image<->text entries are non-zero, plus image<->image with ``self_weight``), one
row per batch row only when rows differ (CFG's unconditional rows, several prompts), one per head only when a
layer selector names heads. The tensors are cached per (grid, prompt, dtype, device); hard masks are reused
as they are, soft biases are multiplied by the step's decay.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, PrivateAttr, field_validator, model_validator

from ..errors import ControlError, TokenError
from ..masks import ASPECT_TOLERANCE, RegionGrids, load_mask
from ..select import select
from .base import Control, StepWindow, StrictOptions, listify, register

TEXT_KINDS = ("cross", "joint", "single")
_CACHE_LIMIT = 64  # cached bias tensors per control (one per grid x prompt x batch composition)


class Region(StrictOptions):
    """One region: a phrase of the prompt and where it goes (a box or a mask image, exactly one)."""

    phrase: str = Field(description="A phrase of the prompt, e.g. 'red circle' ('circle#2': second occurrence).")
    box: list[float] | None = Field(None, description="[x0, y0, x1, y1] as fractions of width and height "
                                                      "(origin top left), 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1.")
    mask: str | None = Field(None, description="Path of a mask image, mode L or 1 (white = inside), any size with "
                                               "the image's aspect ratio; resized to every layer's token grid.")
    _mask: torch.Tensor | None = PrivateAttr(None)

    @field_validator("phrase")
    @classmethod
    def _phrase(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("give a non-empty phrase of the prompt, e.g. 'red circle'")
        return value.strip()

    @field_validator("box")
    @classmethod
    def _box(cls, box):
        if box is None:
            return box
        if len(box) != 4:
            raise ValueError(f"a box is 4 numbers [x0, y0, x1, y1], got {len(box)}")
        if any(not math.isfinite(v) or v < 0 or v > 1 for v in box):
            raise ValueError("box values are fractions of width/height: each must be in [0, 1]")
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise ValueError("the box has zero area: need x0 < x1 and y0 < y1 ([x0, y0, x1, y1], top-left origin)")
        return box

    @model_validator(mode="after")
    def _one_shape(self):
        if (self.box is None) == (self.mask is None):
            raise ValueError("give exactly one of box: [x0, y0, x1, y1] or mask: PATH for each region")
        if self.mask is not None and self._mask is None:
            try:
                self._mask = load_mask(self.mask, "mask")
            except ControlError as exc:
                raise ValueError(str(exc)) from None
        return self

    @property
    def shape(self):
        return self.box if self.box is not None else self._mask


class RegionsOptions(StrictOptions):
    regions: list[Region] = Field(min_length=1, description="Regions, each {phrase, box | mask}.")
    background: str | None = Field(None, description="Optional phrase for the part outside every region.")
    mode: Literal["hard", "soft"] = Field("soft", description="hard: masks; soft: DenseDiffusion-style bias.")
    strength: float = Field(4.0, ge=0.0, le=1e4, description="soft: bias in logits before area scaling and decay; "
                                                             "hard: 0 turns the masks off, any other value on.")
    self_weight: float = Field(0.0, ge=0.0, le=10.0, description="soft: image->image bias as a fraction of "
                                                                 "strength (DenseDiffusion: 0.3); 0 = off.")
    decay: float = Field(5.0, ge=0.0, le=100.0, description="soft: exponent p of the time decay (t/1000)^p "
                                                            "(DenseDiffusion: 5); 0 = constant.")
    window: StepWindow = Field(default_factory=lambda: StepWindow(start=0.0, stop=0.3),
                               description="Fraction of the schedule to act in (DenseDiffusion: first 30%).")
    layers: list[str] | None = Field(None, description="Layer selectors (default: every layer with text tokens, "
                                                       "and self-attention layers when self_weight > 0).")

    _listify = field_validator("layers", mode="before")(listify)

    @field_validator("background")
    @classmethod
    def _background(cls, value):
        if value is not None and not value.strip():
            raise ValueError("give a phrase of the prompt, or leave background out")
        return value.strip() if value is not None else value


@register
class Regions(Control):
    """Regional prompting by attention masks or biases; see the module docstring."""

    name = "regions"
    needs_prompt = True
    Options = RegionsOptions

    @property
    def active(self) -> bool:
        opts = self.options
        return opts.strength > 0 and opts.window.stop > opts.window.start

    def bind(self, session):
        opts = self.options
        self._grids = RegionGrids([r.shape for r in opts.regions], complement=True)
        self._phrases = [r.phrase for r in opts.regions] + ([opts.background] if opts.background else [])
        self._cache: dict[tuple, torch.Tensor] = {}
        self._checked_hw: set[tuple[int, int]] = set()
        if not self.active:
            return {}
        kinds = TEXT_KINDS + (("self",) if opts.mode == "soft" and opts.self_weight > 0 else ())
        return select(session.sites, opts.layers, kinds=kinds)

    def on_call_start(self, session):
        self._calls = 0
        self._grids_seen: set[tuple[int, int]] = set()
        prompts = session.prompts
        if not prompts:
            raise ControlError("the regions control needs the prompt text: call the pipeline with prompt strings "
                               "(not only prompt_embeds)")
        for index in range(len(prompts)):  # a missing phrase fails now, before any denoising
            for phrase in self._phrases:
                session.text_positions(index * session.images_per_prompt, phrase)

    def on_call_end(self, session):
        if not getattr(self, "_calls", 0):
            return {}
        finest = max(self._grids_seen, key=lambda hw: hw[0] * hw[1])
        tokens = self._grids.inside(*finest).sum(dim=1).tolist()
        names = [r.phrase for r in self.options.regions] + ["(background)"]
        return {"mode": self.options.mode, "layer_calls": self._calls, "grids": sorted(map(list, self._grids_seen)),
                "tokens": {"grid": list(finest), **{n: int(t) for n, t in zip(names, tokens)}}}

    # -- per attention call ----------------------------------------------------------------------------
    def on_attention(self, call):
        opts = self.options
        if not opts.window.contains(call.step.progress):
            return
        factor = 1.0
        if opts.mode == "soft":
            factor = opts.strength * max(call.step.timestep / 1000.0, 0.0) ** opts.decay
            if factor == 0:
                return
        groups = tuple(None if branch == "uncond" else call.session.prompt_of(sample)
                       for branch, sample in zip(call.layout.branches, call.layout.samples))
        if all(g is None for g in groups):
            return
        latent_hw = call.frame.latent_hw
        if latent_hw is not None and latent_hw not in self._checked_hw:
            self._check_references(latent_hw, call.session.adapter.reference_grids(call.frame.params))
            self._grids.check_aspect(*latent_hw)
            self._checked_hw.add(latent_hw)
        grid = call.grid
        self._grids_seen.add(grid)
        self._calls += 1
        bias = self._bias(call, grid, groups)
        if call.heads is not None:  # a selector named heads: the other heads stay unchanged
            gate = torch.zeros(1, call.q.shape[1], 1, 1, dtype=torch.bool, device=bias.device)
            gate[:, list(call.heads)] = True
            bias = torch.where(gate, bias, torch.zeros((), dtype=bias.dtype, device=bias.device))
        call.add_bias(bias if factor == 1.0 else bias * factor)

    def _check_references(self, latent_hw: tuple[int, int], references: list[tuple[int, int]]) -> None:
        """With reference images in the call, a mask not at the generated image's aspect ratio would be read as
        covering reference tokens: an error naming the mask (regions act on the generated image only)."""
        if not references:
            return
        height, width = latent_hw
        layouts = [(f"reference image {i}", h, w) for i, (h, w) in enumerate(references)]
        layouts += [("the generated image and its references side by side", height,
                     width + sum(w for _, w in references)),
                    ("the generated image and its references stacked", height + sum(h for h, _ in references),
                     width)]
        for index, region in enumerate(self.options.regions):
            if region.mask is None:
                continue
            mask_h, mask_w = region._mask.shape
            ratio = mask_w / mask_h
            if abs(ratio - width / height) <= ASPECT_TOLERANCE * width / height:
                continue
            like = [name for name, h, w in layouts if abs(ratio - w / h) <= ASPECT_TOLERANCE * w / h]
            grids = ", ".join(f"{w}x{h}" for h, w in references)
            raise ControlError(
                f"regions.{index}.mask = {region.mask!r}: the mask is {mask_w}x{mask_h} (width x height)"
                + (f", the aspect ratio of {like[0]}" if like else "")
                + f", but this call carries {len(references)} reference image(s) (token grids {grids}, width x "
                f"height) after the generated image ({width}x{height}); regions act on the generated image only "
                "and never cover reference tokens: draw the mask on the generated image, at its aspect ratio")

    def _bias(self, call, grid: tuple[int, int], groups: tuple) -> torch.Tensor:
        """The cached (1 | B, 1, Sq, Sk) unit bias of this call: hard 0 / -inf, soft +-(1 - area)."""
        q = call.q
        kind = "self" if call.text is None else ("cross" if call.site.kind == "cross" else "joint")
        if kind == "self":  # no text: the bias does not depend on the prompt, only on which rows are controlled
            groups = tuple(None if g is None else "" for g in groups)
        spans = (call.image.start, call.image.stop) + ((call.text.start, call.text.stop) if call.text else ())
        key = (kind, grid, q.shape[2], call.k.shape[2], spans, groups, q.dtype, q.device)
        if key not in self._cache:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            distinct = {g: None for g in groups if g is not None}
            for prompt in distinct:
                distinct[prompt] = self._matrix(call, kind, grid, prompt)
            if len(distinct) == 1 and None not in groups:
                bias = next(iter(distinct.values()))[None, None]
            else:
                zero = torch.zeros(q.shape[2], call.k.shape[2], dtype=torch.float32)
                bias = torch.stack([zero if g is None else distinct[g] for g in groups])[:, None]
            self._cache[key] = bias.to(device=q.device, dtype=q.dtype)
        return self._cache[key]

    def _columns(self, call, prompt: str, n_tokens: int):
        """Key positions of the bound phrases and, per position, its regions: (C,) long, (C, R+1) bool."""
        sample = call.session.prompts.index(prompt) * call.session.images_per_prompt
        owners: dict[int, set[int]] = {}
        n_regions = len(self.options.regions)
        for index, phrase in enumerate(self._phrases):
            region = index if index < n_regions else n_regions  # the background phrase owns the complement
            positions = [p for p in call.text_positions(sample, phrase) if p < call.text.stop]
            if not positions:
                raise TokenError(f"{phrase!r} lies beyond the {call.text.stop - call.text.start} text tokens this "
                                 f"model attends to (the prompt {prompt!r} was truncated); shorten the prompt")
            for p in positions:
                owners.setdefault(p, set()).add(region)
        columns = sorted(owners)
        if call.text.stop - 1 in owners:  # the pad-token trap: the last text token (EOT/padding) stays visible
            raise ControlError(f"a region phrase covers the last text token of {prompt!r}; at least one "
                               "padding/end token must stay visible to every query")
        table = torch.zeros(len(columns), n_tokens, dtype=torch.bool)
        for i, p in enumerate(columns):
            table[i, sorted(owners[p])] = True
        return torch.tensor(columns, dtype=torch.long), table

    def _matrix(self, call, kind: str, grid: tuple[int, int], prompt: str) -> torch.Tensor:
        """(Sq, Sk) float32 unit bias for one prompt: image<->text entries (and image<->image when soft+self)."""
        opts = self.options
        inside = self._grids.inside(*grid)  # (R + 1, N) incl. the background complement
        area = inside.float().mean(dim=1)  # (R + 1,)
        n_q, n_k = call.q.shape[2], call.k.shape[2]
        matrix = torch.zeros(n_q, n_k, dtype=torch.float32)
        image = call.image
        if kind != "self":
            columns, owners = self._columns(call, prompt, len(inside))
            column_inside = (owners.float() @ inside.float()) > 0  # (C, N): the union of the phrase's regions
            if opts.mode == "hard":
                value = torch.zeros(column_inside.shape).masked_fill(~column_inside, float("-inf"))
            else:
                column_area = (owners.float() @ (inside.float())).clamp(max=1).mean(dim=1)  # area of the union
                value = torch.where(column_inside, 1.0, -1.0) * (1 - column_area)[:, None]
            matrix[image][:, columns] = value.T  # image queries -> phrase keys
            if kind == "joint":
                matrix[:, image][columns] = value  # phrase queries -> image keys
        if opts.mode == "soft" and opts.self_weight > 0 and kind != "cross":
            segments = inside.float()
            shared = (segments.T @ segments) > 0  # (N, N): query and key share a segment
            scale = 1 - (segments * area[:, None]).max(dim=0).values  # (N,) 1 - area of the query's segment
            matrix[image, image] += opts.self_weight * torch.where(shared, 1.0, -1.0) * scale[:, None]
        return matrix
