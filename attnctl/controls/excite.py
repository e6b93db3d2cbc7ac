"""``excite``: Attend-and-Excite (Chefer et al., SIGGRAPH 2023, arXiv 2301.13826).

Before each early denoising step the latents move down the gradient of a loss that is large when some subject
of the prompt gets little attention anywhere in the image:

    A      = cross-attention probabilities (image queries -> text tokens) at one grid, mean over layers and heads
    T      = softmax(100 * A[:, prompt tokens])            over the prompt's tokens (start token excluded)
    m_j    = max over the grid of GaussianSmooth(T[:, subject j])
    L      = max_j max(0, 1 - m_j);    z_t <- z_t - alpha_t * dL/dz_t,   alpha_t = 20 * sqrt(linspace(1, 0.5, T))[t]

and at a few steps the update repeats (iterative refinement) until every m_j passes a threshold. With
``separation`` w > 0 the gradient follows L + w * sum_{i<j} sum_p min(S_i, S_j) / sum_p (S_i + S_j) over the
smoothed subject maps S (A-STAR's attention segregation, Agarwal et al., ICCV 2023): subjects that hold their
maxima in the same cells are pushed apart (the thresholds still read the m_j alone). Defaults are the
paper's and its official code's (yuval-alaluf/Attend-and-Excite ``config.py``): the first half of the schedule is
altered (25 of 50 steps), scale factor 20 over the range (1.0, 0.5), refinement at steps {0, 10, 20} of 50 with
thresholds {0.05, 0.5, 0.8} and at most 20 iterations, smoothing kernel 3 with sigma 0.5, softmax scale 100,
the 16x16 grid for SD at 512 px.

Shapes: latents ``z`` (n_samples, C, h, w) in the scheduler's space; probabilities (rows, grid_h * grid_w,
n_columns); subject maps (grid_h, grid_w).

How it stays lean: the gradient-enabled denoiser runs only on the altered steps (diffusers' deprecated pipeline
runs one on every step); only the conditional rows run, every sample in one batch (the loss is a sum of
per-sample losses and samples are independent, so one backward gives each sample its own gradient); only the
prompt's token columns are computed, only at layers of the chosen grid, and the forward stops after the last such
layer (the rest of the network does not touch the loss). Refinement re-runs only the samples still below their
threshold.

Families: UNet cross-attention (SD1.x/2.x, SDXL) and, for SD3 and FLUX, the image-query -> text-key block of joint
attention (double- and single-stream blocks), renormalised over the text keys so it reads like cross-attention.

Intended deviations from the reference (diffusers' ``StableDiffusionAttendAndExcitePipeline``), all documented
in ``tests/test_excite.py`` where they are tested:

- ``softmax_over="prompt"`` (default): the x100 softmax runs over the prompt's real tokens only. The reference
  slices ``[1:-1]`` of the 77 CLIP positions, so the end token and ~70 padding tokens compete with the subjects
  and the scale of the loss depends on the prompt's length (the official code's ``sd_2_1`` switch exists for
  this). ``softmax_over="padded"`` reproduces the reference exactly.
- Refinement happens only at steps inside ``window`` (the reference also refines at a listed step past
  ``max_iter_to_alter``), so an empty window does nothing at all.
- Step windows and refinement steps are fractions of the schedule, as for every control: refinement at fraction f runs
  at step index ceil(f * T). With 50 steps the defaults give the reference's steps 0, 10, 20 and window 0-24.
- The smoothing kernel is the reference's: weights exp(-(d / (2 sigma))^2), reflect padding of ``kernel // 2``
  (the reference pads 1 whatever the kernel size).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from ..attention import key_probabilities
from ..errors import AttnctlError, ControlError, TokenError
from ..select import select
from .base import Control, StepWindow, StrictOptions, listify, register


class ExciteOptions(StrictOptions):
    subjects: Literal["auto"] | list[str] | list[list[str]] = Field(
        description="Words or phrases of the prompt to excite ('cat', 'red circle', 'cat#2' for the second 'cat'); "
                    "one list per prompt of the call; or auto: the shape nouns of ShapesWorld captions.")
    window: StepWindow = Field(default_factory=lambda: StepWindow(start=0.0, stop=0.5),
                               description="Altered part of the schedule (paper: first 25 of 50 steps).")
    scale_factor: float = Field(20.0, gt=0.0, description="Step size scale (paper: 20).")
    scale_range: tuple[float, float] = Field((1.0, 0.5),
                                             description="alpha_t = scale_factor * sqrt(linspace(a, b, T))[t].")
    thresholds: dict[float, float] = Field(
        default_factory=lambda: {0.0: 0.05, 0.2: 0.5, 0.4: 0.8},
        description="Iterative refinement {schedule fraction: max-attention threshold} (paper: steps 0, 10, 20 of "
                    "50 with 0.05, 0.5, 0.8); {} turns refinement off.")
    max_refinement_steps: int = Field(20, ge=1, le=1000,
                                      description="Refinement iterations per step at most (paper: 20).")
    smooth: bool = Field(True, description="Gaussian-smooth each subject map before its max (paper: yes).")
    kernel_size: int = Field(3, ge=1, le=15, description="Smoothing kernel side, odd (paper: 3).")
    sigma: float = Field(0.5, gt=0.0, description="Smoothing sigma (paper: 0.5).")
    softmax_scale: float = Field(100.0, gt=0.0,
                                 description="Attention times this before the softmax over tokens (paper: 100).")
    softmax_over: Literal["prompt", "padded"] = Field(
        "prompt", description="prompt: the prompt's real tokens; padded: every text position but the first and the "
                              "last, as diffusers' pipeline and the official SD1.4 code do.")
    resolution: Literal["auto"] | int | tuple[int, int] = Field(
        "auto", description="Attention grid of the loss: auto (SD/SDXL: the grid nearest 1/4 of the latent side but "
                            "at least min(16, 1/2 of it): 16x16 at 512 px, 32x32 for SDXL at 1024 px, 8x8 on the "
                            "64 px shapes model; SD3/FLUX: their one token grid), a side n (the grid whose longer "
                            "side is n), or [h, w].")
    layers: list[str] | None = Field(None, description="Layer selectors for the loss (default: all with text).")
    early_stop: bool = Field(True, description="Stop the gradient forward after the last layer the loss reads.")
    separation: float = Field(
        0.0, ge=0.0, description="Weight of an overlap penalty between the subjects' smoothed maps, added to the loss "
                                 "(A-STAR's attention segregation; 0: off, the paper's A&E).")
    measure_only: bool = Field(
        False, description="Read each subject's max attention at every step of the window, as the loss would, but "
                           "leave the latents alone (no update, no refinement): the images are those of the plain "
                           "pipeline, the run metadata holds what A&E would have read on them.")

    @field_validator("subjects", mode="before")
    @classmethod
    def _one_word(cls, value):
        return [value] if isinstance(value, str) and value != "auto" else value

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, value):
        if value == "auto":
            return value
        lists = value if value and isinstance(value[0], list) else [value]
        if not value or any(not group for group in lists):
            raise ValueError("give at least one subject: a word or phrase of the prompt, e.g. subjects: [cat, dog]")
        for group in lists:
            for word in group:
                if not word.strip():
                    raise ValueError("a subject is an empty string; name a word of the prompt")
        return value

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, value):
        ordered = sorted(value.items())
        for at, threshold in ordered:
            if not 0.0 <= at < 1.0:
                raise ValueError(f"refinement step {at} is not a fraction of the schedule in [0, 1)")
            if not 0.0 < threshold <= 1.0:
                raise ValueError(f"threshold {threshold} at {at} must be in (0, 1]")
        for (a0, t0), (a1, t1) in zip(ordered, ordered[1:]):
            if t1 < t0:
                raise ValueError(f"thresholds out of order: {t0} at {a0} but {t1} at {a1}; later steps must ask for "
                                 "at least as much attention (paper: {0.0: 0.05, 0.2: 0.5, 0.4: 0.8})")
        return value

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value):
        if value % 2 == 0:
            raise ValueError(f"the smoothing kernel needs an odd side (got {value}; paper: 3)")
        return value

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value):
        sides = [value] if isinstance(value, int) else list(value) if isinstance(value, tuple) else []
        if any(s < 1 for s in sides):
            raise ValueError(f"a grid side must be a positive integer, got {value}")
        return value

    _listify = field_validator("layers", mode="before")(listify)


class _Stop(Exception):
    """Raised after the last layer the loss reads, to end the gradient forward early."""


def smoothing_kernel(size: int, sigma: float) -> torch.Tensor:
    """(size, size) float64 kernel with the reference's weights exp(-(d / (2 sigma))^2), summing to 1."""
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-((d / (2 * sigma)) ** 2))
    kernel = torch.outer(g, g)
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, kernel: torch.Tensor | None) -> torch.Tensor:
    """Each map (N, h, w) convolved with ``kernel`` (reflect padding; None: unchanged)."""
    if kernel is None:
        return maps
    pad = kernel.shape[-1] // 2
    mode = "reflect" if min(maps.shape[-2:]) > pad else "replicate"
    x = F.pad(maps[:, None], (pad, pad, pad, pad), mode=mode)
    return F.conv2d(x, kernel.to(maps)[None, None])[:, 0]


def smooth_max(maps: torch.Tensor, kernel: torch.Tensor | None) -> torch.Tensor:
    """Max over the grid of each smoothed map: maps (N, h, w) -> (N,)."""
    return smooth(maps, kernel).flatten(1).max(dim=1).values


def overlap(maps: torch.Tensor) -> torch.Tensor:
    """Sum over pairs i < j of sum_p min(A_i, A_j) / sum_p (A_i + A_j) for non-negative maps (N, h, w): 0 when
    no cell holds two subjects, 0.5 per pair of identical maps (A-STAR's segregation loss, Agarwal et al., ICCV
    2023, arXiv 2306.14544). A scalar; 0 for fewer than two maps."""
    flat = maps.flatten(1)
    total = flat.new_zeros(())
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            total = total + torch.minimum(flat[i], flat[j]).sum() / (flat[i] + flat[j]).sum().clamp_min(1e-12)
    return total


def _slice_bias(bias, heads, image: slice, text: slice):
    """The part of an additive/boolean bias (broadcastable to (B, H, Sq, Sk)) for heads x image x text."""
    if bias is None:
        return None
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device).masked_fill(~bias, float("-inf"))
    while bias.ndim < 4:
        bias = bias.unsqueeze(0)
    if bias.shape[1] > 1 and heads is not None:
        bias = bias[:, heads]
    if bias.shape[2] > 1:
        bias = bias[:, :, image]
    if bias.shape[3] > 1:
        bias = bias[..., text]
    return bias


class _Collector:
    """Accumulates head-summed probabilities per grid during one gradient forward."""

    def __init__(self, columns: list[int], target, expected_calls: int | None):
        self.columns = columns
        self.target = target  # None: discovery (collect every grid)
        self.expected = expected_calls
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.heads: dict[tuple[int, int], int] = {}
        self.calls: dict[tuple[int, int], int] = {}

    def add(self, grid, probs: torch.Tensor) -> None:  # probs: (rows, H, Sq, C)
        total = probs.sum(dim=1)
        self.sums[grid] = total if grid not in self.sums else self.sums[grid] + total
        self.heads[grid] = self.heads.get(grid, 0) + probs.shape[1]
        self.calls[grid] = self.calls.get(grid, 0) + 1


@register
class Excite(Control):
    """Attend-and-Excite as a latent-updating control (protocol kind 3).

    After a pipeline call: ``history`` lists each altered step (losses, maxima, refinement iterations as
    tensors), ``maps`` holds the subject maps the loss saw at the last altered step ``{subject: (n, h, w)}``
    (for saved overlays, put a ``maps`` control beside this one). The run metadata gets, per image, the final
    max attention per subject, the refinement iterations and the loss per altered step. With ``measure_only`` the
    same readings are taken on the plain pipeline's latents (one forward per step of the window, no gradient, no
    change to the images): the diagnostics of a run without A&E.
    """

    name = "excite"
    needs_prompt = True
    Options = ExciteOptions

    def bind(self, session):
        self._session = session
        self._grids: dict[tuple, tuple[tuple[int, int], int, list[tuple[int, int]]]] = {}
        return select(session.sites, self.options.layers, kinds=("cross", "joint", "single"))

    # -- per call ------------------------------------------------------------------------------------------
    def on_call_start(self, session):
        self._collect: _Collector | None = None
        self._plans: dict[int, dict] = {}
        self.history: list[dict] = []
        self.maps: dict[str, torch.Tensor] = {}
        self._grid = None
        if session.prompts:  # fail before any denoising when a subject is not in a prompt
            subjects = self.options.subjects
            if isinstance(subjects[0], list) and len(subjects) != len(session.prompts):
                raise ControlError(f"excite.subjects has {len(subjects)} lists but the call has "
                                   f"{len(session.prompts)} prompts; give one list per prompt or one shared list")
            for p in range(len(session.prompts)):
                self._plan(p * session.images_per_prompt, None)

    def _subjects_of(self, sample: int) -> list[str]:
        subjects = self.options.subjects
        if subjects == "auto":
            return caption_subjects(self._session.prompt_of(sample))
        if subjects and isinstance(subjects[0], list):
            return list(subjects[sample // self._session.images_per_prompt])
        return list(subjects)

    def _plan(self, sample: int, text_len: int | None) -> dict:
        """Softmax columns (text-span positions) and each subject's indices among them, for one sample."""
        key = (sample, text_len)
        if key in self._plans:
            return self._plans[key]
        session = self._session
        subjects = self._subjects_of(sample)
        positions = {}
        for word in subjects:
            try:
                positions[word] = session.text_positions(sample, word)
            except TokenError as exc:
                raise TokenError(f"excite.subjects: {exc}") from None
        if self.options.softmax_over == "padded":
            columns = list(range(1, text_len - 1)) if text_len else sorted({p for v in positions.values() for p in v})
        else:
            columns = _prompt_tokens(session, sample)
        if text_len is not None:
            columns = [c for c in columns if c < text_len]
        index = {c: i for i, c in enumerate(columns)}
        plan = {"subjects": subjects, "columns": columns, "index": {}}
        for word, where in positions.items():
            missing = [p for p in where if p not in index]
            if missing:
                raise TokenError(f"excite.subjects: {word!r} sits at text positions {missing}, outside the "
                                 f"{len(columns)} positions the loss reads (truncated prompt?)")
            plan["index"][word] = [index[p] for p in where]
        self._plans[key] = plan
        return plan

    def on_call_end(self, session):
        if not self.history:
            return {}
        images = {}
        for record in self.history:
            for sample, loss, maxima, overlap_, iterations in zip(record["samples"], record["loss"],
                                                                   record["max_attention"], record["overlap"],
                                                                   record["iterations"]):
                entry = images.setdefault(sample, {"subjects": record["subjects"][sample], "loss": [],
                                                   "refinement": {}, "refinement_iterations": 0})
                entry["loss"].append(round(float(loss), 4))
                entry["max_attention"] = {w: round(float(m), 4) for w, m in zip(entry["subjects"], maxima)}
                entry["overlap"] = round(float(overlap_), 4)
                if record["refined"]:
                    entry["refinement"][str(record["step"])] = int(iterations)
                    entry["refinement_iterations"] += int(iterations)
        out = {"grid": list(self._grid) if self._grid else None, "altered_steps": len(self.history),
               "images": [images[s] for s in sorted(images)]}
        if self.options.measure_only:
            out["measure_only"] = True
        return out

    # -- the latent update -----------------------------------------------------------------------------------
    def wants_latent_update(self, step):
        return self.options.window.contains(step.progress)

    def _threshold_at(self, step) -> float | None:
        chosen = None
        for at, threshold in self.options.thresholds.items():
            if math.ceil(at * step.total - 1e-9) == step.index:
                chosen = threshold if chosen is None else max(chosen, threshold)
        return chosen

    def _step_size(self, step) -> float:
        a, b = self.options.scale_range
        fraction = a + (b - a) * step.index / (step.total - 1) if step.total > 1 else a
        return self.options.scale_factor * math.sqrt(fraction)

    def update_latents(self, update):
        opts = self.options
        step = update.step
        samples = [update.frame.layout.samples[r] for r in update.rows]
        alpha = self._step_size(step)
        z = update.z.detach()
        rows = list(range(len(samples)))
        if opts.measure_only:
            losses, maxima, _ = self._evaluate(update, z, rows, gradient=False)
            self.history.append({
                "step": step.index, "alpha": 0.0, "samples": samples, "loss": losses, "max_attention": maxima,
                "overlap": self._overlap,
                "iterations": [0] * len(rows), "refined": False,
                "subjects": {s: self._plan(s, update.frame.text_len)["subjects"] for s in samples},
            })
            return None
        losses, maxima, grad = self._evaluate(update, z, rows)
        overlaps = self._overlap
        iterations = [0] * len(rows)
        threshold = self._threshold_at(step)
        if threshold is not None:
            target = max(0.0, 1.0 - threshold)
            active = [r for r in rows if float(losses[r]) > 1.0 - threshold]
            while active:
                for r in active:
                    iterations[r] += 1
                z = z.clone()
                z[active] = z[active] - alpha * grad[active]
                before = [float(losses[r]) for r in active]
                sub_losses, sub_maxima, sub_grad = self._evaluate(update, z[active], active)
                sub_maxima = F.pad(sub_maxima, (0, maxima.shape[1] - sub_maxima.shape[1]))  # fewer subjects
                losses[active], maxima[active], grad[active] = sub_losses, sub_maxima, sub_grad
                overlaps[active] = self._overlap
                active = [r for r, b in zip(active, before) if b > target and iterations[r] < opts.max_refinement_steps]
        z = z - alpha * grad
        plans = {s: self._plan(s, update.frame.text_len) for s in samples}
        self.history.append({
            "step": step.index, "alpha": alpha, "samples": samples, "loss": losses.clone(),
            "max_attention": maxima.clone(), "overlap": overlaps.clone(), "iterations": iterations, "refined": threshold is not None,
            "subjects": {s: plans[s]["subjects"] for s in samples},
        })
        return z - update.z

    def _evaluate(self, update, z: torch.Tensor, rows: list[int], gradient: bool = True):
        """Loss (R,), per-subject max attention (R, J) and dL/dz (R, ...; None without ``gradient``) for ``rows``
        of ``update``'s batch."""
        frame = update.frame
        sub = update if len(rows) == len(update.rows) else type(update)(
            update.session, update.params, [update.rows[r] for r in rows], update.scale, z, frame)
        samples = [frame.layout.samples[update.rows[r]] for r in rows]
        plans = [self._plan(s, frame.text_len) for s in samples]
        columns = sorted({c for plan in plans for c in plan["columns"]})
        known = self._grids.get(frame.latent_hw)
        collector = _Collector(columns, known[0] if known else None,
                               known[1] if known and self.options.early_stop else None)
        z = z.detach().requires_grad_(gradient)
        self._collect = collector
        try:
            sub.denoise(z)
        except _Stop:
            pass
        finally:
            self._collect = None
        if known is None:
            known = self._choose_grid(frame.latent_hw, collector)
        grid = known[0]
        self._grid = grid
        mean = collector.sums[grid] / collector.heads[grid]  # (R, Sq, C)
        where = {c: i for i, c in enumerate(columns)}
        kernel = smoothing_kernel(self.options.kernel_size, self.options.sigma) if self.options.smooth else None
        losses, maxima, overlaps = [], [], []
        for i, plan in enumerate(plans):
            cols = torch.tensor([where[c] for c in plan["columns"]], device=mean.device)
            tokens = torch.softmax(self.options.softmax_scale * mean[i].index_select(-1, cols), dim=-1)
            maps = torch.stack([tokens[:, plan["index"][w]].sum(dim=-1).reshape(grid) for w in plan["subjects"]])
            smoothed = smooth(maps, kernel)
            peak = smoothed.flatten(1).max(dim=1).values
            losses.append(torch.clamp(1.0 - peak, min=0.0).max())
            overlaps.append(overlap(smoothed))
            maxima.append(peak.detach())
            for w, m in zip(plan["subjects"], maps.detach()):
                self._store_map(w, samples[i], m)
        losses = torch.stack(losses)
        self._overlap = torch.stack(overlaps).detach()
        # The thresholds read the attention term alone; the gradient follows the whole loss.
        total = losses + self.options.separation * torch.stack(overlaps) if self.options.separation else losses
        if not gradient:
            grad = None
        elif bool((total > 0).any()):
            (grad,) = torch.autograd.grad(total.sum(), z)
        else:
            grad = torch.zeros_like(z)
        width = max(len(m) for m in maxima)
        maxima = torch.stack([F.pad(m, (0, width - len(m))) for m in maxima])
        return losses.detach(), maxima, None if grad is None else grad.detach()

    def _store_map(self, word: str, sample: int, grid_map: torch.Tensor) -> None:
        n = self._session.images_per_prompt * len(self._session.prompts or [None])
        store = self.maps.get(word)
        if store is None or store.shape[1:] != grid_map.shape:
            store = self.maps[word] = torch.zeros(n, *grid_map.shape)
        store[sample] = grid_map.float().cpu()

    def _choose_grid(self, latent_hw, collector: _Collector):
        available = sorted(collector.sums, key=lambda g: (-g[0] * g[1], g))
        if not available:
            raise ControlError("excite found no attention layer with text tokens in the chosen layers")
        wanted = self.options.resolution
        if wanted == "auto":
            grid = auto_grid(latent_hw, available)
        else:
            matches = [g for g in available if (g == tuple(wanted) if isinstance(wanted, tuple) else max(g) == wanted)]
            if not matches:
                listed = ", ".join(f"{h}x{w}" for h, w in available)
                size = "x".join(str(s) for s in latent_hw) if latent_hw else "?"
                raise ControlError(f"excite.resolution = {wanted!r}: this model produces attention grids {listed} at "
                                   f"this image size ({size} latents) in the chosen layers; use one of them or auto")
            grid = matches[0]
        known = (grid, collector.calls[grid], available)
        self._grids[latent_hw] = known
        return known

    # -- attention -------------------------------------------------------------------------------------------
    def on_attention(self, call):
        collector = self._collect
        if collector is None or call.text is None:
            return
        grid = call.grid
        if collector.target is not None and grid != collector.target:
            return
        heads = list(call.heads) if call.heads is not None else None

        def read(out):
            # Runs after every control edited the call, so the probabilities are the ones attention used.
            q, k = call.q[:, :, call.image], call.k[:, :, call.text]
            if heads is not None:
                q, k = q[:, heads], k[:, heads]
            dtype = torch.promote_types(q.dtype, torch.float32)
            bias = _slice_bias(call.bias, heads, call.image, call.text)
            probs = key_probabilities(q.to(dtype), k.to(dtype), collector.columns,
                                      bias=None if bias is None else bias.to(dtype))
            collector.add(grid, probs)
            if collector.expected is not None and collector.calls[grid] >= collector.expected:
                raise _Stop
            return out

        call.then(read)


def auto_grid(latent_hw: tuple[int, int], available: list[tuple[int, int]]) -> tuple[int, int]:
    """``resolution: auto``: the one grid of a DiT, else the grid nearest ``max(side / 4, min(16, side / 2))``.

    The paper's grid is 1/4 of the latent side (SD at 512 px: 16x16; SDXL at 1024 px: 32x32), but never coarser
    than it needs: below ~8 cells a side the max no longer tells a drawn subject from a neglected one (shapes
    model, 16x16 latents: at 4x4 both peak at 0.24 on average; at 8x8, 0.52 drawn vs 0.25 neglected).
    """
    if len(available) == 1:
        return available[0]
    side = max(latent_hw)
    target = max(side / 4, min(16, side / 2))
    return min(available, key=lambda g: (abs(math.log(max(g) / target)), -max(g)))


def caption_subjects(prompt: str) -> list[str]:
    """``subjects: auto``: the shape nouns of a ShapesWorld caption in order, a repeated noun as ``noun#n``."""
    from ..shapes.data import parse_caption

    try:
        objects = parse_caption(prompt)
    except AttnctlError as exc:
        raise ControlError(f"excite.subjects = auto names the shapes of ShapesWorld captions (the shapes models), "
                           f"but {prompt!r} is not one ({exc}); list the words instead, e.g. subjects: [cat, dog]"
                           ) from None
    seen: dict[str, int] = {}
    out = []
    for obj in objects:
        seen[obj["shape"]] = seen.get(obj["shape"], 0) + 1
        out.append(obj["shape"] if seen[obj["shape"]] == 1 else f"{obj['shape']}#{seen[obj['shape']]}")
    return out


def _prompt_tokens(session, sample: int) -> list[int]:
    """Text-span positions of the prompt's real tokens (no start, end or padding token), every text encoder."""
    prompt = session.prompt_of(sample)
    positions: list[int] = []
    for segment in session.adapter.text_segments(session.pipe):
        tokenizer = segment.tokenizer
        kwargs = dict(add_special_tokens=True)
        if segment.max_length is not None:
            kwargs.update(truncation=True, max_length=segment.max_length)
        ids = list(tokenizer(prompt, **kwargs).input_ids)
        special = set(tokenizer.all_special_ids)
        positions += [segment.offset + i for i, t in enumerate(ids) if t not in special]
    return positions
