"""``interpolate``: attention interpolation between prompts (AID / PAID, He et al., NeurIPS 2024, arXiv 2403.17924).

How a sequence is generated (``Interpolate.generate``): one pipeline call whose batch rows are the frames.
Frame 0 is prompt A, frame N-1 is prompt B (a chain A -> B -> C has an anchor every N-1 frames); the pipeline
is called with the list of frame prompts (the guide prompt, or a placeholder, for in-between frames), one
generator per frame seeded alike (or two seeds with slerped noise), so an anchor frame is exactly the plain
generation of its prompt. The in-between frames' own text conditioning (their text stream, pooled embeddings,
their keys when fused, and everything after the warm-up) is the linear interpolation of the anchors' text
encodings (AID), or the guide prompt (PAID). Inside attention (protocol kind 4, rows coupled through
``call.layout``), during the warm-up part of the schedule, each in-between frame's image queries attend with
keys/values interpolated between its two anchors' rows of the same call:

- UNet self-attention: the anchors' image keys/values; UNet cross-attention: the anchors' text keys/values;
- SD3 / FLUX joint attention and FLUX single-stream blocks: the anchors' whole joint sequence (image and text
  tokens; FLUX puts text first), the frame's text queries left as they are;
- fusion (``fuse``): over ``[own keys, interpolated keys]``, the frame's own self-attention kept (paper Sec. 4.2).

Uncond rows are never interpolated (as in the reference implementation); any other branch (e.g. PAG's perturbed
rows) is coupled within its own rows. Interpolated attention replaces other controls' edits on those queries.

Defaults follow the reference implementation's ``interpolate``: fused outer interpolation for the first half of
the steps (warm-up ratio 0.5, plain attention after), Beta-spaced coefficients (Sec. 4.3; alpha = beta = 3, its
``generate_beta_tensor`` default), 7 frames. On the embedded ``shapes`` model fused *inner* interpolation with
``spacing: auto`` measured smoothest (recipes/interpolate.yaml); see ``attnctl eval interp``.

Cost: the engine computes plain attention for every row and the interpolated rows' image queries are then
recomputed (outer: two SDPA calls over [own, endpoint] keys, batched as one), during the warm-up only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, field_validator

from .. import interpolation as maths
from ..errors import ControlError
from ..select import select
from .base import Control, StepWindow, StrictOptions, listify, register


class InterpolateOptions(StrictOptions):
    prompts: list[str] | None = Field(None, description="Prompts in order (A, B[, C...]); default: the recipe's "
                                      "prompt list.")
    frames: int = Field(7, ge=2, le=256, description="Frames per pair of prompts, both endpoints included.")
    mode: Literal["outer", "inner", "embedding"] = Field(
        "outer", description="outer: blend attention over A and over B; inner: attention over blended keys/values; "
        "embedding: naive text-embedding interpolation only (the baseline, attention untouched).")
    fuse: bool = Field(True, description="Fuse with the frame's own keys/values: attend over [own, interpolated].")
    spacing: Literal["beta", "uniform", "auto"] = Field(
        "beta", description="Coefficients: Beta(alpha, beta) quantiles, uniform, or auto (a uniform probe run, "
        "then alpha/beta fitted to even out the measured distances between adjacent frames).")
    alpha: float = Field(3.0, gt=0, description="Beta distribution alpha (spacing: beta).")
    beta: float = Field(3.0, gt=0, description="Beta distribution beta (spacing: beta).")
    guide_prompt: str | None = Field(None, description="PAID: the prompt of the in-between frames.")
    warmup: float = Field(0.5, gt=0, le=1, description="Fraction of the schedule with interpolated attention "
                          "(plain attention after it); 1 = every step.")
    latents: Literal["shared", "slerp"] = Field("shared", description="shared: one seed for every frame; slerp: "
                                                "spherical interpolation between one seed per prompt.")
    seeds: list[int] | None = Field(None, description="slerp: one seed per prompt (default: seed, seed+1, ...).")
    distance: Literal["lab", "ssim", "lpips"] = Field("lab", description="Frame distance for metrics and auto "
                                                      "spacing (lpips only with local weights).")
    layers: list[str] | None = Field(None, description="Layer selectors (default: every attention layer).")
    gif_seconds: float = Field(0.15, gt=0, le=10, description="Seconds per GIF frame.")

    _listify = field_validator("layers", mode="before")(listify)

    @field_validator("prompts")
    @classmethod
    def _two_prompts(cls, value):
        if value is not None and (len(value) < 2 or any(not p.strip() for p in value)):
            raise ValueError(f"give at least 2 non-empty prompts to interpolate between, got {value!r}")
        return value


@dataclass(frozen=True)
class FramePlan:
    """Which frame is what. ``left``/``right``: the anchor frames each frame lies between; ``t``: its coefficient
    (0 at ``left``, 1 at ``right``); ``anchors``: frame index of each prompt."""

    prompts: tuple[str, ...]
    anchors: tuple[int, ...]
    left: tuple[int, ...]
    right: tuple[int, ...]
    t: tuple[float, ...]

    @classmethod
    def build(cls, prompts, segment_ts: list[list[float]]) -> FramePlan:
        """``segment_ts[s]``: coefficients of segment s (prompt s -> s+1), starting at 0 and ending at 1."""
        anchors, left, right, t = [0], [0], [0], [0.0]
        for s, ts in enumerate(segment_ts):
            start = anchors[-1]
            end = start + len(ts) - 1
            for j, value in enumerate(ts[1:], start=1):
                is_end = j == len(ts) - 1
                left.append(end if is_end else start)
                right.append(end)
                t.append(0.0 if is_end else float(value))
            anchors.append(end)
        return cls(tuple(prompts), tuple(anchors), tuple(left), tuple(right), tuple(t))

    @property
    def n_frames(self) -> int:
        return len(self.t)

    def positions(self) -> list[float]:
        """Each frame's place along the chain: segment index + t (0, ..., 1 for A -> B; up to 2 for A -> B -> C)."""
        out = []
        for f in range(self.n_frames):
            if f in self.anchors:
                out.append(float(self.anchors.index(f)))
            else:
                out.append(self.anchors.index(self.left[f]) + self.t[f])
        return out

    def between(self) -> list[int]:
        """Frames that are not anchors."""
        anchors = set(self.anchors)
        return [f for f in range(self.n_frames) if f not in anchors]

    def frame_prompts(self, guide: str | None) -> list[str]:
        """The prompt list of the pipeline call: anchors' prompts, the guide (or the left anchor's) elsewhere."""
        by_anchor = dict(zip(self.anchors, self.prompts))
        return [by_anchor.get(f, guide if guide is not None else by_anchor[self.left[f]])
                for f in range(self.n_frames)]


@dataclass
class InterpolationResult:
    """Frames (PIL images, or latents with ``output_type='latent'``), their coefficients and the metrics."""

    frames: list
    plan: FramePlan
    distances: list[float] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def strip(self):
        return maths.contact_strip(self.frames)

    def gif(self, seconds_per_frame: float = 0.15) -> bytes:
        return maths.gif_bytes(self.frames, seconds_per_frame)


@register
class Interpolate(Control):
    """Attention interpolation. Use ``generate(pipe, seed=...)`` (it applies itself if no ``apply`` is active)::

        control = Interpolate(prompts=["a red circle", "a blue square"], frames=9)
        result = control.generate(pipe, seed=0, num_inference_steps=25)
        result.strip().save("strip.png")
    """

    name = "interpolate"
    Options = InterpolateOptions
    takes_all_prompts = True  # a recipe's prompts are the sequence A -> B (-> C ...): one item per seed

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        self._plan: FramePlan | None = None
        self._session = None
        self.calls = 0

    # -- engine hooks --------------------------------------------------------------------------------------
    def bind(self, session):
        self._session = session
        if self.options.mode == "embedding":
            return {}
        return select(session.sites, self.options.layers)

    def on_call_start(self, session):
        if self._plan is None:
            raise ControlError("control 'interpolate' generates whole sequences: call control.generate(pipe, ...) "
                               "(or run a recipe with controls: {interpolate: ...}); a plain pipe(...) call does not "
                               "say which batch rows are frames")
        if session.prompts is not None and len(session.prompts) != self._plan.n_frames:
            raise ControlError(f"interpolate: the pipeline was called with {len(session.prompts)} prompts, the plan "
                               f"has {self._plan.n_frames} frames")
        self.calls = 0
        self._active_window = self._window()

    def on_call_end(self, session):
        return {"interpolated_calls": self.calls}

    def _window(self) -> StepWindow:
        return StepWindow(start=0.0, stop=self.options.warmup)

    def on_attention(self, call):
        plan = self._plan
        if plan is None or not self._active_window.contains(call.step.progress):
            return
        layout = call.layout
        between = set(plan.between())
        rows_i, rows_l, rows_r, ts = [], [], [], []
        for branch in dict.fromkeys(layout.branches):
            if branch == "uncond":
                continue
            row_of = {layout.samples[r]: r for r in layout.rows(branch)}
            for frame, row in row_of.items():
                if frame in between and plan.left[frame] in row_of and plan.right[frame] in row_of:
                    rows_i.append(row)
                    rows_l.append(row_of[plan.left[frame]])
                    rows_r.append(row_of[plan.right[frame]])
                    ts.append(plan.t[frame])
        if not rows_i:
            return
        self.calls += 1
        heads = list(call.heads) if call.heads is not None else None
        mode, fuse = self.options.mode, self.options.fuse

        def interpolate(out: torch.Tensor) -> torch.Tensor:
            q, k, v = call.q, call.k, call.v
            if heads is not None:
                q, k, v = q[:, heads], k[:, heads], v[:, heads]
            ri = torch.tensor(rows_i, device=q.device)
            queries = q[ri][:, :, call.image]
            bias = None
            if call.bias is not None:  # the frame's own mask, for its own and the interpolated keys alike
                b = call.bias
                if b.dtype == torch.bool:
                    b = torch.zeros(b.shape, dtype=q.dtype, device=q.device).masked_fill(~b, float("-inf"))
                while b.ndim < 4:
                    b = b.unsqueeze(0)
                b = b.to(q.dtype).expand(call.q.shape[0], call.q.shape[1], call.q.shape[2], call.k.shape[2])
                b = b[ri][:, heads] if heads is not None else b[ri]
                b = b[:, :, call.image]
                bias = torch.cat([b, b], dim=-1) if fuse else b
            result = maths.interpolated_attention(
                queries, k[rows_l], v[rows_l], k[rows_r], v[rows_r], torch.tensor(ts), mode=mode,
                k_self=k[ri] if fuse else None, v_self=v[ri] if fuse else None, bias=bias,
            )
            out = out.clone()
            if heads is None:
                out[ri, :, call.image] = result.to(out.dtype)
            else:
                block = out[ri][:, :, call.image]
                block[:, heads] = result.to(out.dtype)
                out[ri, :, call.image] = block
            return out

        call.then(interpolate)

    def wants_latent_update(self, step):
        return self._plan is not None and self.options.latents == "slerp" and step.index == 0

    def update_latents(self, update):
        """Slerp initial noise: each frame's rows were drawn from its left anchor's seed; blend towards the right."""
        plan, z = self._plan, update.z
        if z.shape[0] != plan.n_frames:
            return None
        delta = torch.zeros_like(z)
        for frame in plan.between():
            target = maths.slerp(z[plan.left[frame]], z[plan.right[frame]], plan.t[frame])
            delta[frame] = target - z[frame]
        return delta

    # -- generation ------------------------------------------------------------------------------------------
    def generate(self, pipe, *, seed: int = 0, prompts: list[str] | None = None, **call_kwargs) -> InterpolationResult:
        """Generate the whole sequence. ``call_kwargs`` go to the pipeline (steps, size, guidance, output_type...).

        With ``spacing: auto`` this runs the pipeline twice: a uniform probe, then the fitted Beta spacing.
        """
        prompts = list(prompts or self.options.prompts or [])
        if len(prompts) < 2:
            raise ControlError(f"interpolate needs at least 2 prompts (A and B), got {prompts!r}: set "
                               "controls.interpolate.prompts or give the recipe a list of prompts")
        for bad in ("generator", "latents", "num_images_per_prompt", "prompt_embeds"):
            if call_kwargs.get(bad) is not None:
                raise ControlError(f"interpolate.generate sets {bad} itself (one per frame); do not pass it")
            call_kwargs.pop(bad, None)
        check_prompt_lengths(pipe, prompts + ([self.options.guide_prompt] if self.options.guide_prompt else []),
                             call_kwargs.get("max_sequence_length"))
        seeds = self._seeds(seed, len(prompts))
        opts, n = self.options, self.options.frames
        metadata: dict = {"mode": opts.mode, "fuse": opts.fuse, "spacing": opts.spacing, "frames_per_pair": n,
                          "distance": opts.distance, "distance_description": maths.DISTANCES[opts.distance],
                          "guide_prompt": opts.guide_prompt, "warmup": self._window().stop, "latents": opts.latents,
                          "seeds": seeds, "prompts": prompts}
        with self._applied(pipe):
            if opts.spacing == "uniform":
                segment_ts = [[i / (n - 1) for i in range(n)]] * (len(prompts) - 1)
            elif opts.spacing == "beta":
                segment_ts = [maths.beta_quantiles(n, opts.alpha, opts.beta)] * (len(prompts) - 1)
                metadata["alpha_beta"] = [[opts.alpha, opts.beta]] * (len(prompts) - 1)
            else:
                segment_ts, metadata["auto"] = self._auto_spacing(pipe, prompts, seeds, call_kwargs)
                metadata["alpha_beta"] = [entry["alpha_beta"] for entry in metadata["auto"]]
            plan = FramePlan.build(prompts, segment_ts)
            frames = self._run(pipe, plan, seeds, call_kwargs)
        result = InterpolationResult(frames, plan, metadata=metadata)
        metadata["t"] = [round(v, 6) for v in plan.positions()]
        metadata["anchors"] = list(plan.anchors)
        if frames and not isinstance(frames[0], torch.Tensor):
            result.distances = maths.frame_distances(frames, opts.distance)
            metadata.update(sequence_metrics(result.distances))
        return result

    def generate_item(self, pipe, prompts: list[str], seed: int, call_kwargs: dict) -> dict:
        """``attnctl run`` hook: one sequence per seed; the contact strip is the item's image, with the frames,
        a GIF and the metrics beside it."""
        kwargs = {k: v for k, v in call_kwargs.items() if k != "generator"}
        result = self.generate(pipe, seed=seed, prompts=self.options.prompts or prompts, **kwargs)

        return {"image": result.strip(), "extra": {f"frame{i:03d}": im for i, im in enumerate(result.frames)},
                "files": {"interpolation.gif": result.gif(self.options.gif_seconds)}, "info": result.metadata}

    def _seeds(self, seed: int, n_prompts: int) -> list[int]:
        if self.options.latents == "shared":
            return [seed] * n_prompts
        seeds = self.options.seeds or [seed + i for i in range(n_prompts)]
        if len(seeds) != n_prompts:
            raise ControlError(f"interpolate.seeds has {len(seeds)} seeds for {n_prompts} prompts; give one per "
                               "prompt (latents: slerp)")
        return list(seeds)

    @contextmanager
    def _applied(self, pipe) -> Iterator[None]:
        session = self._session
        if session is not None and session.active and session.pipe is pipe:
            yield
            return
        from ..engine import apply

        with apply(pipe, [self]):
            yield

    def _run(self, pipe, plan: FramePlan, seeds: list[int], call_kwargs: dict) -> list:
        opts = self.options
        anchor_seed = dict(zip(plan.anchors, seeds))
        generators = [torch.Generator("cpu").manual_seed(anchor_seed.get(f, anchor_seed[plan.left[f]]))
                      for f in range(plan.n_frames)]
        self._plan = plan
        try:
            with mixed_text_encodings(pipe, plan, enabled=opts.guide_prompt is None, session=self._session):
                output = pipe(prompt=plan.frame_prompts(opts.guide_prompt), generator=generators,
                              num_images_per_prompt=1, **call_kwargs)
        finally:
            self._plan = None
        images = output.images if hasattr(output, "images") else output[0]
        return list(images)

    def _auto_spacing(self, pipe, prompts, seeds, call_kwargs):
        """A uniform probe run, adjacent distances, and per pair the Beta whose CDF matches their cumulative sum."""
        n = self.options.frames
        probe_t = [i / (n - 1) for i in range(n)]
        kwargs = dict(call_kwargs)
        kwargs.pop("output_type", None)  # distances need images
        plan = FramePlan.build(prompts, [probe_t] * (len(prompts) - 1))
        frames = self._run(pipe, plan, seeds, kwargs)
        if n < 4:
            return [probe_t] * (len(prompts) - 1), [{"alpha_beta": [1.0, 1.0], "probe_distances": []}
                                                     for _ in prompts[1:]]
        segments, info = [], []
        for s in range(len(prompts) - 1):
            chunk = frames[plan.anchors[s]: plan.anchors[s + 1] + 1]
            distances = maths.frame_distances(chunk, self.options.distance)
            alpha, beta = maths.fit_beta(probe_t, maths.cumulative_distance(distances))
            segments.append(maths.beta_quantiles(n, alpha, beta))
            info.append({"alpha_beta": [alpha, beta],
                         "probe_distances": [round(d, 5) for d in distances],
                         "probe_smoothness": round(maths.smoothness(distances), 5)})
        return segments, info


def sequence_metrics(distances: list[float]) -> dict:
    """The run metadata of a frame sequence: adjacent distances, smoothness and consistency."""
    return {"distances": [round(d, 6) for d in distances],
            "smoothness": round(maths.smoothness(distances), 6),
            "consistency": round(maths.consistency(distances), 6)}


@contextmanager
def mixed_text_encodings(pipe, plan: FramePlan, *, enabled: bool = True, session=None) -> Iterator[None]:
    """Within the block, the pipeline's text encodings of in-between frames are the linear interpolation of their
    anchors' (AID's conditioning of in-between frames; alone, the naive text-embedding interpolation baseline).

    Works for every family without knowing its encoders: ``encode_prompt`` is wrapped and each float tensor of
    its output with one row per frame (prompt embeddings, pooled embeddings, negative ones) is re-mixed row-wise.
    ``session``: the active attnctl session, told of the rewrite so that it still knows which denoiser call
    carries the prompt's embeddings (Chroma's cond and uncond calls are told apart that way).
    """
    original = pipe.__dict__.get("encode_prompt")
    inner = pipe.encode_prompt
    if not enabled or not plan.between():
        yield
        return
    n = plan.n_frames
    index = torch.arange(n)
    left, right = torch.tensor(plan.left), torch.tensor(plan.right)
    weight = torch.tensor(plan.t, dtype=torch.float64)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[plan.between()] = True

    def mix(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 2 and value.shape[0] == n:
            w = weight.to(value.dtype).reshape(-1, *([1] * (value.ndim - 1)))
            mixed = torch.lerp(value[left], value[right], w.to(value.device))
            return torch.where(mask.reshape(w.shape).to(value.device), mixed, value[index])
        if isinstance(value, tuple):
            return tuple(mix(v) for v in value)
        if isinstance(value, list):
            return [mix(v) for v in value]
        return value

    def encode_prompt(*args, **kwargs):
        result = inner(*args, **kwargs)
        mixed = mix(result)
        if session is not None:
            session.replace_encoded(result, mixed)
        return mixed

    pipe.encode_prompt = encode_prompt
    try:
        yield
    finally:
        if original is None:
            pipe.__dict__.pop("encode_prompt", None)
        else:
            pipe.encode_prompt = original


def check_prompt_lengths(pipe, prompts: list[str], max_sequence_length: int | None = None) -> None:
    """Every prompt must fit its text encoders' padded length, so that both endpoints' keys line up token by token.

    diffusers pads every prompt of a batch to one fixed length (CLIP 77, T5 ``max_sequence_length``), so prompts
    of different token counts interpolate fine; a prompt longer than that cannot be padded, only truncated, and
    its endpoint would silently lose its last words: that is an error here.
    """
    from ..adapters import adapter_for

    for segment in adapter_for(pipe).text_segments(pipe):
        tokenizer = segment.tokenizer
        if tokenizer is None:
            continue
        limit = segment.max_length or max_sequence_length
        if limit is None:
            continue
        for prompt in prompts:
            count = len(tokenizer(prompt, truncation=False)["input_ids"])
            if count > limit:
                raise ControlError(
                    f"interpolate: prompt {prompt!r} tokenises to {count} tokens with {type(tokenizer).__name__}, "
                    f"longer than the {limit} this family pads every prompt to; it would be truncated and the "
                    "endpoints would no longer line up token by token. Shorten it"
                    + (" or raise max_sequence_length" if segment.max_length is None else "")
                )
