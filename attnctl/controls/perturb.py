"""``perturb``: perturbed-attention guidance (PAG) and its head-level, soft form (SoftPAG).

PAG (Ahn et al. 2024, arXiv 2403.17377) runs one more branch of the denoiser in which chosen
self-attention maps are replaced by the identity (each token attends only to itself, so the layer's output is
its values V), and guides away from it::

    with CFG:     eps = uncond + w (cond - uncond) + s (cond - perturbed)
    without CFG:  eps = cond + s (cond - perturbed)

HeadHunter (arXiv 2506.10978, "Fine-Grained Perturbation Guidance via Attention Head Selection") perturbs
individual heads instead of whole layers and softens the map per head: A' = (1 - u) A + u I, so a head's
output is (1 - u) softmax(QK^T / sqrt(d)) V + u V. u = 1 is PAG's identity, u = 0 no perturbation.
Layer-level PAG is the case "all heads, u = 1".

The perturbed rows run in the same denoiser call as uncond and cond (protocol kind 2: ``branches`` adds
them, the engine folds ``guidance`` into the pipeline's own CFG). Outside ``window`` no row is added, so
those steps cost nothing extra (diffusers' newer PAG guider defaults to a 1%-20% window for the same reason).
The perturbed rows equal the cond rows up to the first perturbed block, so the engine adds them only there
(``apply(..., share_prefix=True)``, the default): PAG on SDXL's mid block skips the down path for them.

Targets are exact layer selectors (``attnctl.select``), optionally with heads: ``"mid_block:heads=0,3"``.
They resolve to self-attention (UNet ``attn1``, SD3.5's image-only ``attn2``), joint attention (SD3, FLUX
double-stream) and FLUX single-stream sites; cross-attention is never perturbed. ``mode`` says what the
identity replaces at joint and single-stream sites: ``full``, the whole [image; text] map (every token sees
only itself), or ``image``, only the image->image block (text rows and columns untouched: image queries still
see every text key, text queries see everything). ``image`` is what diffusers' SD3 PAG processor
(``PAGCFGJointAttnProcessor2_0``) computes; at UNet self-attention both modes are the same.

Default targets when none are given (``DEFAULT_LAYERS``): diffusers' PAG defaults written as exact selectors:
SD1.x and SDXL ``mid_block`` (its self-attention; diffusers' ``"mid"``), SD3 ``transformer_blocks.1``
(diffusers' ``"blocks.1"`` without its match of blocks 10-19), FLUX ``single_transformer_blocks.0`` (diffusers
has no FLUX PAG; our choice, present in every FLUX checkpoint: run ``attnctl hunt`` to find better heads),
Z-Image ``layers.1`` (the second main single-stream layer; also our choice, as for Qwen-Image's
``transformer_blocks.1``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..errors import ControlError
from ..select import select
from .base import Control, StepWindow, StrictOptions, listify, register

DEFAULT_LAYERS: dict[str, list[str]] = {
    "sd15": ["mid_block"],
    "sdxl": ["mid_block"],
    "sd3": ["transformer_blocks.1"],
    "flux": ["single_transformer_blocks.0"],
    "flux2": ["single_transformer_blocks.0"],
    "chroma": ["single_transformer_blocks.0"],
    "qwenimage": ["transformer_blocks.1"],
    "zimage": ["layers.1"],
}

# Sites an identity map makes sense at: the query and key sequences are the same tokens.
PERTURBABLE_KINDS = ("self", "joint", "single")


class PerturbTarget(StrictOptions):
    """Layers (and heads) perturbed with one SoftPAG strength ``u``."""

    layers: list[str] = Field(min_length=1, description="Layer selectors with optional heads, e.g. "
                                                        "'mid_block:heads=0,3' (all heads when none are named).")
    u: float = Field(1.0, ge=0.0, le=1.0, description="SoftPAG strength in [0, 1]: 1 = PAG identity, 0 = none.")

    _as_list = field_validator("layers", mode="before")(listify)


class PerturbOptions(StrictOptions):
    """Options of ``perturb``. Give targets as ``layers`` + ``u`` (one strength for all) or as ``targets``
    (a list of ``{layers, u}``), not both; with neither, the family's ``DEFAULT_LAYERS`` at strength ``u``."""

    scale: float = Field(3.0, ge=0.0, description="PAG guidance scale s >= 0 (diffusers' default pag_scale 3.0).")
    layers: list[str] | None = Field(None, min_length=1, description="Layer/head selectors (simple form).")
    u: float = Field(1.0, ge=0.0, le=1.0, description="SoftPAG strength for `layers` (1 = PAG identity).")
    targets: list[PerturbTarget] | None = Field(None, min_length=1,
                                                description="Per-target form: [{layers: [...], u: 0.5}, ...].")
    window: StepWindow = Field(default_factory=StepWindow, description="Fraction of the schedule with PAG.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Scale over the window: constant, linear or cosine decay from s to 0.")
    mode: Literal["full", "image"] = Field(
        "image", description="Joint/single-stream sites: identity on the whole map (full) or on the "
                             "image->image block only (image, as diffusers' SD3 PAG).")

    _as_list = field_validator("layers", mode="before")(listify)

    @model_validator(mode="after")
    def _one_form(self):
        if self.targets is not None and self.layers is not None:
            raise ValueError("give either `layers` (with `u`) or `targets`, not both")
        if self.targets is not None and "u" in self.model_fields_set:
            raise ValueError("`u` applies to `layers`; with `targets` give each target its own `u`")
        return self

    def resolved_targets(self, family: str) -> list[PerturbTarget]:
        if self.targets is not None:
            return list(self.targets)
        return [PerturbTarget(layers=self.layers or DEFAULT_LAYERS[family], u=self.u)]


def scale_at(options: PerturbOptions, progress: float) -> float:
    """The guidance scale at ``progress`` (a fraction of the schedule); 0 outside the window."""
    window = options.window
    if not window.contains(progress):
        return 0.0
    if options.schedule == "constant" or window.stop <= window.start:
        return options.scale
    x = min(max((progress - window.start) / (window.stop - window.start), 0.0), 1.0)
    if options.schedule == "linear":
        return options.scale * (1.0 - x)
    return options.scale * 0.5 * (1.0 + math.cos(math.pi * x))


def head_strengths(session, targets: list[PerturbTarget]) -> dict[str, torch.Tensor]:
    """Per-site SoftPAG strengths: ``{site name: (H,) float tensor}``, max over targets that hit a head."""
    heads_of = {site.name: site.heads for site in session.sites}
    strengths: dict[str, torch.Tensor] = {}
    for target in targets:
        for name, heads in select(session.sites, target.layers, kinds=PERTURBABLE_KINDS).items():
            u = strengths.setdefault(name, torch.zeros(heads_of[name], dtype=torch.float64))
            index = list(range(heads_of[name])) if heads is None else list(heads)
            u[index] = torch.clamp(u[index], min=target.u)
    return strengths


@register
class Perturb(Control):
    """Perturbed-attention guidance on chosen layers and heads, in the pipeline's own batched call.

    ``branch`` names the extra batch branch (default ``perturb``); two instances with different branches
    guide independently. After a call, diagnostics list the perturbed sites and the steps that had the branch.
    """

    name = "perturb"
    Options = PerturbOptions

    def __init__(self, options=None, *, branch: str = "perturb", **kwargs):
        super().__init__(options, **kwargs)
        self.branch = branch
        self.strengths: dict[str, torch.Tensor] = {}
        self._steps: list[int] = []

    def bind(self, session):
        targets = self.options.resolved_targets(session.family)
        self.strengths = head_strengths(session, targets)
        sites = {name for name, u in self.strengths.items() if bool((u > 0).any())}
        self._check_modes(session, sites)
        return {name: None for name in sorted(sites)}

    def _check_modes(self, session, sites: set[str]) -> None:
        """Another perturb control of this session acting on one of ``sites`` must use the same ``mode``: one
        attention computation has one mode, and letting the last control's win would be silent."""
        for other in session.controls:
            if other is self or not isinstance(other, Perturb) or other.options.mode == self.options.mode:
                continue
            theirs = head_strengths(session, other.options.resolved_targets(session.family))
            shared = sorted(name for name in sites if name in theirs and bool((theirs[name] > 0).any()))
            if shared:
                first, second = sorted((self, other), key=session.controls.index)
                raise ControlError(
                    f"perturb controls disagree: mode = {first.options.mode!r} and mode = {second.options.mode!r} "
                    f"at {', '.join(shared)}; one layer takes one mode (allowed: 'full' or 'image'), so give both "
                    "the same mode or disjoint layers")

    @property
    def active(self) -> bool:
        """Whether any selected head has u > 0 (else the perturbed branch would equal cond: skip it)."""
        return any(bool((u > 0).any()) for u in self.strengths.values())

    def on_call_start(self, session):
        self._steps: list[int] = []

    def on_call_end(self, session):
        return {"sites": sorted(self.strengths), "steps": self._steps}

    def branches(self, step):
        # Scale 0 or outside the window: no extra rows at all (the plain pipeline's batch, its exact numbers).
        if self.options.scale == 0 or not self.options.window.contains(step.progress) or not self.active:
            return ()
        if not self._steps or self._steps[-1] != step.index:
            self._steps.append(step.index)
        return (self.branch,)

    def row_strengths(self, call) -> torch.Tensor | None:
        """(B, H) strengths for this call: the site's head strengths on the perturbed rows, 0 elsewhere."""
        rows = call.layout.rows(self.branch)
        if not rows:
            return None
        u = torch.zeros(call.q.shape[0], call.q.shape[1], dtype=call.q.dtype, device=call.q.device)
        u[rows] = self.strengths[call.site.name].to(u)
        return u

    def on_attention(self, call):
        u = self.row_strengths(call)
        if u is not None:
            call.perturb(u, self.options.mode)

    def guidance(self, step, preds):
        """``s(progress) * (cond - perturbed)``; preds are (n_samples, ...) noise predictions per branch."""
        scale = scale_at(self.options, step.progress)
        if self.branch not in preds:
            return None
        return scale * (preds["cond"] - preds[self.branch])
