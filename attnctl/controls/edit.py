"""``edit``: prompt-based editing by coupling a target row to a source row of the same batch (protocol kind 4).

Call the pipeline with prompts ``[source, target]`` (``pairs: first``: sample 0 is the source of every other
sample; ``pairs: pairs``: samples 2i -> 2i+1) and the same initial latent (one seed for both rows, or an inverted
latent, see ``attnctl.editing``). Inside the windows below the target row takes the source's attention:

- ``cross`` (Prompt-to-Prompt, Hertz et al. 2022, sec. 3.2): the target's maps of image queries over the text
  tokens become the source's, through the token alignment of ``kind`` (``swap``: word k -> word k; ``refine``:
  shared tokens, added words keep their own maps; ``reweight``: like swap, and the maps of the ``reweight`` words
  are scaled). Default window: the first 80% of steps (P2P's ``cross_replace_steps=0.8``) on models with
  cross-attention; on MM-DiT models (no cross sites) it is off unless set, and when set it acts on the
  image->text block of the joint attention. A pure swap of equal token counts is exact without materialising
  maps (the target computes with the source's queries and keys, so its map *is* the source's); refinement and
  reweighting materialise probabilities, only at those sites and steps, in query chunks.
- ``self_attention`` (P2P's self-attention injection): the target's self-attention maps (``inject: maps``) or
  keys and values (``inject: kv``, as MasaCtrl) become the source's. Default: the first 40% of steps
  (P2P's ``self_replace_steps=0.4``), every self-attention site.
- ``joint`` (MM-DiT, Shin et al. ICCV 2025): ``inject`` copies the source's projections, per token group
  (default ``[q_image, k_image]``: their method "qiki"); ``blocks`` replaces whole regions of the joint map,
  named query->key (``image->text`` = image queries reading text keys; the paper names blocks by the direction
  information flows, so its "T2I" is our ``image->text``). Text tokens in regions go through the alignment.
  Default window: the first 20% of steps (their tau = 0.2), every joint and single-stream site.
- ``blend`` (local blend, P2P sec. 3.3): after each scheduler step inside ``blend.window``, the target latents
  outside a mask are replaced by the source's. The mask: the cross-attention maps of ``blend.words`` (default:
  the words that differ), summed over the steps so far and the selected layers on the finest grid they have,
  normalised to [0, 1] by its minimum and maximum (P2P divides by the maximum only; the small ShapesWorld model's
  maps have a floor of about 0.3 of the maximum, which made every pixel editable), max-pooled (``dilate``) and
  thresholded (0.3, as P2P and Shin et al.), source and target unioned;
  or a user mask (``mask``: an image path, white = editable; or an array passed as ``Edit(..., mask=array)``).

Layer selectors choose whole layers: edits act on every head, so a ``:heads=`` part is an error.
Only the rows of ``branches`` (default the conditional rows, as P2P) are coupled; the source rows are never
changed. Masks per target sample are kept in ``masks`` ({sample: (h, w) float tensor in [0, 1]}).
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from ..attention import key_probabilities
from ..align import Alignment, align_prompts, check_swappable
from ..errors import ControlError, TokenError
from ..select import select
from .base import Control, StepWindow, StrictOptions, listify, register

GROUPS = ("q_image", "k_image", "v_image", "q_text", "k_text", "v_text")
BLOCKS = ("image->image", "image->text", "text->image", "text->text")


class CrossOptions(StrictOptions):
    window: StepWindow | None = Field(None, description="Steps of map replacement (default 0.8 with cross sites).")
    layers: list[str] | None = Field(None, description="Layer selectors (default: cross sites, else joint+single).")
    _layers = field_validator("layers", mode="before")(listify)


class SelfOptions(StrictOptions):
    window: StepWindow = Field(default_factory=lambda: StepWindow(start=0.0, stop=0.4))
    layers: list[str] | None = Field(None, description="Layer selectors (default: every self-attention site).")
    inject: Literal["maps", "kv"] = Field("maps", description="maps: the source's maps; kv: its keys and values.")
    _layers = field_validator("layers", mode="before")(listify)


class JointOptions(StrictOptions):
    window: StepWindow = Field(default_factory=lambda: StepWindow(start=0.0, stop=0.2))
    layers: list[str] | None = Field(None, description="Layer selectors (default: every joint/single site).")
    inject: list[Literal[GROUPS]] = Field(default_factory=lambda: ["q_image", "k_image"])
    blocks: list[Literal[BLOCKS]] = Field(default_factory=list, description="Map regions taken from the source.")
    _layers = field_validator("layers", mode="before")(listify)


class BlendOptions(StrictOptions):
    words: list[str] | None = Field(None, description="Words whose maps make the mask (default: the changed ones).")
    threshold: float = Field(0.3, gt=0.0, lt=1.0)
    dilate: int = Field(1, ge=0, le=8, description="Max-pool radius at the attention grid (P2P: 1).")
    window: StepWindow = Field(default_factory=lambda: StepWindow(start=0.0, stop=1.0))
    layers: list[str] | None = Field(None, description="Sites whose maps make the mask (default: all with text).")
    mask: str | None = Field(None, description="A mask image (white = editable) instead of attention maps.")
    _lists = field_validator("layers", "words", mode="before")(listify)


class EditOptions(StrictOptions):
    kind: Literal["swap", "refine", "reweight"] = "swap"
    reweight: dict[str, float] = Field(default_factory=dict, description="Target words -> map scale.")
    cross: CrossOptions = Field(default_factory=CrossOptions)
    self_attention: SelfOptions = Field(default_factory=SelfOptions)
    joint: JointOptions = Field(default_factory=JointOptions)
    blend: BlendOptions | None = None
    target: str | None = Field(None, description="attnctl run: the target prompt each recipe prompt is edited to.")
    image: str | None = Field(None, description="attnctl run: a real source image file, inverted under the prompt.")
    pairs: Literal["first", "pairs"] = "first"
    branches: list[str] = Field(default_factory=lambda: ["cond"], min_length=1)

    @model_validator(mode="after")
    def _reweight_needs_words(self):
        if self.kind == "reweight" and not self.reweight:
            raise ValueError("kind 'reweight' needs reweight: {word: factor}, e.g. {red: 2.0}")
        return self

    @field_validator("reweight")
    @classmethod
    def _weights(cls, value):
        for word, w in value.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"reweight[{word!r}] = {w}: must be a finite number >= 0")
        return value


def _changed_words(source: str, target: str) -> tuple[list[str], list[str]]:
    import difflib

    ws, wt = source.split(), target.split()
    ops = difflib.SequenceMatcher(a=ws, b=wt, autojunk=False).get_opcodes()
    return ([w for tag, i0, i1, _, _ in ops if tag != "equal" for w in ws[i0:i1]],
            [w for tag, _, _, j0, j1 in ops if tag != "equal" for w in wt[j0:j1]])


@register
class Edit(Control):
    """Prompt-to-Prompt / MM-DiT editing across the rows of one batch. See the module docstring."""

    name = "edit"
    needs_prompt = True
    Options = EditOptions

    def __init__(self, options=None, *, mask=None, **kwargs):
        super().__init__(options, **kwargs)
        self.user_mask = None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.float32)
        if self.user_mask is None and self.options.blend is not None and self.options.blend.mask:
            from PIL import Image

            try:
                image = Image.open(self.options.blend.mask).convert("L")
            except OSError as exc:
                raise ControlError(f"blend.mask: cannot read {self.options.blend.mask!r}: {exc}") from None
            self.user_mask = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        if self.user_mask is not None and self.user_mask.ndim != 2:
            raise ControlError(f"mask: expected a (H, W) array, got shape {tuple(self.user_mask.shape)}")
        if self.user_mask is not None and self.options.blend is None:  # a mask means: blend with it
            self.options = self.options.model_copy(update={"blend": BlendOptions()})
        self.masks: dict[int, torch.Tensor] = {}
        self._suspended = False
        self._pairs: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def suspended(self):
        """Pipeline calls in this block run as if the control were absent (e.g. inverting the source image)."""
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

    # -- set-up ------------------------------------------------------------------------------------------
    def bind(self, session):
        opts, sites = self.options, session.sites
        kinds = {s.kind for s in sites}

        def chosen(layers, allowed, default_kinds=None, field=""):
            if layers is None:
                return {s.name for s in sites if s.kind in (default_kinds or allowed)}
            _whole_layers(field, layers, sites, allowed)
            return set(select(sites, layers, kinds=allowed))

        cross_kinds = ("cross",) if "cross" in kinds else ("joint", "single")
        self._cross_window = opts.cross.window
        if self._cross_window is None:
            on = "cross" in kinds or opts.kind == "reweight" or bool(opts.reweight)
            self._cross_window = StepWindow(start=0.0, stop=0.8 if on else 0.0)
        self._cross = chosen(opts.cross.layers, ("cross", "joint", "single"), cross_kinds, "cross.layers")
        self._self = chosen(opts.self_attention.layers, ("self",), field="self_attention.layers")
        self._joint = chosen(opts.joint.layers, ("joint", "single"), field="joint.layers")
        self._blend_sites = set()
        if opts.blend is not None and self.user_mask is None:
            self._blend_sites = chosen(opts.blend.layers, ("cross", "joint", "single"), field="blend.layers")
        if (opts.kind == "reweight" or opts.reweight) and not self._cross:
            raise ControlError("reweighting acts on cross-attention maps, but no layer with text tokens is selected "
                               "(cross.layers)")
        self._segments = session.adapter.text_segments(session.pipe)
        wanted = self._cross | self._self | self._joint | self._blend_sites
        return {name: None for name in wanted}

    def on_call_start(self, session):
        opts = self.options
        self.masks, self._pairs = {}, []
        if self._suspended:
            return
        self._sums: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
        self._alignments: dict[tuple[int, int, int], Alignment] = {}
        self._blend_words: dict[int, list[str]] = {}
        prompts = session.prompts
        if not prompts:
            raise ControlError("edit needs the prompt text: call the pipeline with [source, target] prompts")
        self._pairs = _sample_pairs(opts.pairs, len(prompts), session.images_per_prompt)
        if not self._pairs:
            raise ControlError("edit needs at least two prompts: [source, target]")
        self._source_of = {t: s for s, t in self._pairs}
        for s, t in self._pairs:
            source, target = session.prompt_of(s), session.prompt_of(t)
            if opts.kind != "refine":
                check_swappable(source, target, opts.kind)
            for word in opts.reweight:
                try:
                    session.text_positions(t, word)
                except TokenError as exc:
                    raise ControlError(f"reweight: {exc}") from None
            if opts.blend is not None and self.user_mask is None:
                if opts.blend.words:
                    words_s = [w for w in opts.blend.words if self._has(session, s, w)]
                    words_t = [w for w in opts.blend.words if self._has(session, t, w)]
                    if not words_s and not words_t:
                        raise ControlError(f"blend.words {opts.blend.words} occur in neither {source!r} nor "
                                           f"{target!r}")
                else:
                    words_s, words_t = _changed_words(source, target)
                    words_t = words_t or list(opts.reweight)
                    if not words_s and not words_t:
                        raise ControlError(f"local blend: {source!r} and {target!r} do not differ; name the "
                                           "words of the edited region in blend.words")
                self._blend_words.setdefault(s, [])
                self._blend_words[s] += [w for w in words_s if w not in self._blend_words[s]]
                self._blend_words[t] = words_t

    @staticmethod
    def _has(session, sample, word) -> bool:
        try:
            session.text_positions(sample, word)
            return True
        except TokenError:
            return False

    def _alignment(self, session, s: int, t: int, length: int) -> Alignment:
        key = (s, t, length)
        if key not in self._alignments:
            kind = self.options.kind
            self._alignments[key] = align_prompts(self._segments, session.prompt_of(s), session.prompt_of(t), kind,
                                                  length)
        return self._alignments[key]

    # -- attention ---------------------------------------------------------------------------------------
    def _row_pairs(self, layout) -> list[tuple[int, int, int, int]]:
        """(source row, target row, source sample, target sample) for the coupled branches."""
        index = {(b, s): r for r, (b, s) in enumerate(zip(layout.branches, layout.samples))}
        out = []
        for branch in self.options.branches:
            for s, t in self._pairs:
                if (branch, s) in index and (branch, t) in index:
                    out.append((index[(branch, s)], index[(branch, t)], s, t))
        return out

    def on_attention(self, call):
        if not self._pairs:
            return
        name, progress = call.site.name, call.step.progress
        pairs = self._row_pairs(call.layout)
        if name in self._blend_sites:
            self._capture_blend(call)
        if not pairs:
            return
        opts = self.options
        kind = call.site.kind
        copy: set[str] = set()
        regions: set[tuple[str, str]] = set()
        if kind == "self" and name in self._self and opts.self_attention.window.contains(progress):
            copy |= {"q_image", "k_image"} if opts.self_attention.inject == "maps" else {"k_image", "v_image"}
        if kind in ("joint", "single") and name in self._joint and opts.joint.window.contains(progress):
            copy |= set(opts.joint.inject)
            regions |= {tuple(b.split("->")) for b in opts.joint.blocks}
        cross = name in self._cross and call.text is not None and self._cross_window.contains(progress)
        reweight = cross and bool(opts.reweight)
        if cross:
            if kind == "cross" and not reweight and all(
                    self._alignment(call.session, s, t, call.k.shape[2]).identity for _, _, s, t in pairs):
                copy |= {"q_image", "k_text"}  # exact map swap without materialising it
            else:
                regions.add(("image", "text"))
        if copy:
            self._copy(call, pairs, copy)
        if regions:
            call.then(lambda out: self._replace_regions(call, pairs, regions, reweight, out))

    @staticmethod
    def _group_span(call, group: str) -> slice | None:
        """Where ``group`` (e.g. ``k_image``) lies in its axis of this call, or None when the call has none."""
        which, tokens = group.split("_")
        joint = call.text is not None and call.q.shape[2] == call.k.shape[2]  # one sequence of image and text
        if which == "q":
            return call.image if tokens == "image" else (call.text if joint else None)
        if tokens == "text":
            return call.text
        if call.text is None:  # self-attention: every key is an image token
            return slice(0, call.k.shape[2])
        return call.image if joint else None

    def _copy(self, call, pairs, groups: set[str]) -> None:
        """Target rows take the source rows' projections of ``groups`` (q/k/v x image/text tokens)."""
        tensors = {"q": call.q, "k": call.k, "v": call.v}
        new: dict[str, torch.Tensor] = {}
        for group in sorted(groups):
            span = self._group_span(call, group)
            if span is None or span.stop <= span.start:
                continue
            which = group[0]
            tensor = new.setdefault(which, tensors[which].clone())
            for rs, rt, _, _ in pairs:
                tensor[rt, :, span] = tensors[which][rs, :, span]
        call.q, call.k, call.v = new.get("q", call.q), new.get("k", call.k), new.get("v", call.v)

    def _replace_regions(self, call, pairs, regions, reweight: bool, out: torch.Tensor) -> torch.Tensor:
        """Recompute the target rows' outputs with map regions taken from the source. out: (B, H, Sq, D)."""
        q, k, v, bias = call.q, call.k, call.v, call.bias
        scale = 1.0 / math.sqrt(q.shape[-1])
        text, image = call.text, call.image
        n_text = text.stop - text.start
        like = {"device": q.device, "dtype": q.dtype}  # alignments are built (and cached) on the CPU in float64
        out = out.clone()
        for rs, rt, s, t in pairs:
            align = self._alignment(call.session, s, t, n_text)
            matrix = align.matrix.to(**like)  # (n_text source, n_text target)
            own = align.own.to(**like)  # (n_text,) target tokens that keep their own map
            equalizer = None
            if reweight:
                equalizer = torch.ones(n_text, **like)  # (n_text,) per target token
                for word, w in self.options.reweight.items():
                    for p in call.session.text_positions(t, word):
                        equalizer[p] = w
            for group in ("image", "text"):
                keys = {kg for qg, kg in regions if qg == group}
                if not keys or (group == "text" and text.stop - text.start == 0):
                    continue
                if group == "image":
                    rows_t = torch.arange(image.start, image.stop, device=q.device)
                    rows_s = rows_t
                else:  # text queries: target token j reads the source token it is aligned to (one to one)
                    best = align.matrix.argmax(dim=0)
                    mapped = [j for j in range(n_text) if align.matrix[best[j], j] > 0]
                    rows_t = torch.tensor([text.start + j for j in mapped], dtype=torch.long, device=q.device)
                    rows_s = torch.tensor([text.start + int(best[j]) for j in mapped], dtype=torch.long,
                                          device=q.device)
                for lo in range(0, len(rows_t), 1024):
                    qt, qs = q[rt][:, rows_t[lo:lo + 1024]], q[rs][:, rows_s[lo:lo + 1024]]
                    logits_t = qt @ k[rt].transpose(-1, -2) * scale
                    logits_s = qs @ k[rs].transpose(-1, -2) * scale
                    if bias is not None:
                        logits_t = logits_t + _bias_rows(bias, rt, rows_t[lo:lo + 1024], q.dtype)
                        logits_s = logits_s + _bias_rows(bias, rs, rows_s[lo:lo + 1024], q.dtype)
                    p_t, p_s = logits_t.softmax(-1), logits_s.softmax(-1)
                    p_new = p_t.clone()
                    if "image" in keys:
                        p_new[..., image] = p_s[..., image]
                    if "text" in keys:
                        p_new[..., text] = p_s[..., text] @ matrix + p_t[..., text] * own
                        if equalizer is not None and group == "image":
                            p_new[..., text] = p_new[..., text] * equalizer
                    out[rt, :, rows_t[lo:lo + 1024]] = (p_new @ v[rt]).to(out.dtype)
        return out

    # -- local blend -------------------------------------------------------------------------------------
    def _capture_blend(self, call) -> None:
        opts = self.options.blend
        if call.text is None or not call.layout.has("cond"):
            return
        rows = call.layout.rows("cond")
        h, w = call.grid
        for r in rows:
            sample = call.layout.samples[r]
            words = self._blend_words.get(sample)
            if not words:
                continue
            positions = sorted({p for word in words if self._has(call.session, sample, word)
                                for p in call.text_positions(sample, word)})
            if not positions:
                continue
            # Before any replacement (P2P stores the target's own maps): this row's q/k as they are now.
            probs = key_probabilities(call.q[r : r + 1, :, call.image], call.k[r : r + 1], positions)
            grid = probs[0].sum(-1).mean(0).reshape(h, w).detach().float().cpu()
            store = self._sums.setdefault(sample, {})
            store[(h, w)] = store.get((h, w), torch.zeros(h, w)) + grid

    def _word_mask(self, sample: int) -> torch.Tensor | None:
        """The sample's blend-word map on the finest grid captured, min-max normalised to [0, 1], dilated."""
        sums = self._sums.get(sample)
        if not sums:
            return None
        m = sums[max(sums, key=lambda hw: hw[0] * hw[1])]
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        d = self.options.blend.dilate
        if d:
            m = F.max_pool2d(m[None, None], 2 * d + 1, stride=1, padding=d)[0, 0]
        return m

    def _mask_for(self, s: int, t: int) -> torch.Tensor | None:
        """(h, w) float mask in [0, 1] of target sample ``t``: 1 where the target may differ from the source."""
        if self.user_mask is not None:
            return (self.user_mask >= 0.5).float()
        th = self.options.blend.threshold
        parts = [m for m in (self._word_mask(s), self._word_mask(t)) if m is not None]
        if not parts:
            return None
        h = max(p.shape[0] for p in parts)
        w = max(p.shape[1] for p in parts)
        mask = torch.zeros(h, w)
        for p in parts:
            if p.shape != (h, w):
                p = F.interpolate(p[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            mask = torch.maximum(mask, (p > th).float())
        return mask

    def after_step(self, step, latents):
        opts = self.options.blend
        if opts is None or not self._pairs or not opts.window.contains(step.progress):
            return None
        changed = False
        for s, t in self._pairs:
            mask = self._mask_for(s, t)
            if mask is None:
                continue
            self.masks[t] = mask
            m = _to_latents(mask, latents).to(latents.dtype)
            if not changed:
                latents, changed = latents.clone(), True
            latents[t] = latents[s] + m * (latents[t] - latents[s])
        return latents if changed else None

    # -- attnctl run: one item = one edit ---------------------------------------------------------------
    def baseline_prompt(self, prompt: str) -> str:
        """What a side-by-side run (``--compare``) shows beside an edit: the target prompt generated from the same
        seed without control, i.e. "just regenerate with the new prompt"."""
        return self.options.target or prompt

    def generate_item(self, pipe, prompt: str, seed: int, kwargs: dict) -> dict:
        """Edit ``prompt`` (the source) to ``options.target`` inside the run's ``apply``: target image, plus the
        source and the blend mask as extra images."""
        from ..editing import edit

        if not self.options.target:
            raise ControlError("controls.edit.target: give the target prompt each recipe prompt is edited to")
        call = dict(kwargs)
        call.pop("generator", None)
        result = edit(pipe, prompt, self.options.target, image=self.options.image, seed=seed,
                      steps=call.pop("num_inference_steps"), guidance_scale=call.pop("guidance_scale"),
                      height=call.pop("height", None), width=call.pop("width", None), options=self,
                      apply_controls=False, **call)
        return {"image": result.target, "extra": {"source": result.source, "mask": result.mask_image()},
                "info": {"source_prompt": prompt, "target_prompt": self.options.target,
                         "source_image": self.options.image}}

    def on_call_end(self, session):
        for s, t in getattr(self, "_pairs", []):
            if t not in self.masks and self.options.blend is not None:
                mask = self._mask_for(s, t)
                if mask is not None:
                    self.masks[t] = mask
        return {"pairs": [list(p) for p in getattr(self, "_pairs", [])],
                "mask_fraction": {str(t): round(float(m.mean()), 4) for t, m in self.masks.items()},
                "blend_words": {str(k): v for k, v in getattr(self, "_blend_words", {}).items()}}


def _whole_layers(field: str, layers: list[str], sites, kinds) -> None:
    """Edits copy and replace whole attention computations, every head at once: a selector naming heads would
    be ignored, so it is an error naming the option and the selector."""
    for text in layers:
        if any(heads is not None for heads in select(sites, [text], kinds=kinds).values()):
            raise ControlError(f"{field}: {text!r} names heads (':heads='), but edits act on every head of a layer; "
                               f"give the layer alone, e.g. {text.split(':heads=')[0]!r}")


def _sample_pairs(pairs: str, n_prompts: int, per_prompt: int) -> list[tuple[int, int]]:
    """(source sample, target sample) pairs. Samples are prompt-major (prompt p's image i is sample
    p * per_prompt + i), and image i of a target prompt is paired with image i of its source prompt: with
    ``num_images_per_prompt`` > 1 the source's second image is a second source, never a target."""
    if pairs == "first":
        prompt_pairs = [(0, p) for p in range(1, n_prompts)]
    else:
        if n_prompts % 2:
            raise ControlError(f"edit: pairs = 'pairs' needs an even number of prompts (source, target, ...), "
                               f"got {n_prompts}")
        prompt_pairs = [(2 * j, 2 * j + 1) for j in range(n_prompts // 2)]
    return [(s * per_prompt + i, t * per_prompt + i) for s, t in prompt_pairs for i in range(per_prompt)]


def _bias_rows(bias: torch.Tensor, row: int, queries: torch.Tensor, dtype) -> torch.Tensor:
    """Batch row ``row`` and query rows ``queries`` of a bias broadcastable to (B, H, Sq, Sk)."""
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill(~bias, float("-inf"))
    while bias.ndim < 4:
        bias = bias.unsqueeze(0)
    bias = bias[row] if bias.shape[0] > 1 else bias[0]
    return bias[:, queries] if bias.shape[1] > 1 else bias


def _to_latents(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A (h, w) mask for one latent row: (1, H, W) for (B, C, H, W) latents, (L, 1) for packed (B, L, C) tokens."""
    if latents.ndim == 4:
        size = latents.shape[-2:]
        if mask.shape != size:
            mask = F.interpolate(mask[None, None], size=size, mode="nearest")[0, 0]
        return mask[None].to(latents.device)
    if latents.ndim == 3:
        n = latents.shape[1]
        if mask.numel() != n:
            side = int(round(math.sqrt(n)))
            ratio = mask.shape[1] / mask.shape[0]
            h = max(1, int(round(math.sqrt(n / ratio))))
            w = n // h
            if h * w != n:
                h, w = side, n // side
            mask = F.interpolate(mask[None, None], size=(h, w), mode="nearest")[0, 0]
        return mask.reshape(n, 1).to(latents.device)
    raise ControlError(f"local blend: latents of shape {tuple(latents.shape)} are not (B, C, H, W) or (B, L, C)")
