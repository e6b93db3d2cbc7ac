"""The control protocol: what a control may do, and the registry controls join by name.

A control is options (a pydantic model, validated once) plus hooks the engine calls. Each hook is optional;
a control implements the ones its technique needs:

1. ``on_attention(call)``: edit one attention call (additive bias, mask, per-head blend strength, q/k/v
   replacement, map capture, output hook). Only called for the sites ``bind`` returned.
2. ``branches(step)`` + ``guidance(step, preds)``: extra batch rows (e.g. PAG's perturbed row) built from the
   conditional rows and run in the same denoiser call; ``guidance`` returns the change to the final noise
   prediction, which the engine folds into the conditional rows so the pipeline's own CFG (or none) yields it.
3. ``wants_latent_update(step)`` + ``update_latents(update)``: a latent change before a denoiser step
   (Attend-and-Excite), computed with gradients through ``update.denoise``; step 0 included.
4. Coupling across rows (interpolation endpoints, edit source -> target) is done inside ``on_attention`` with
   the call's ``layout`` (which row is which branch of which sample); ``after_step(step, latents)`` may change
   the latents a scheduler step produced (one row per sample), e.g. an edit's local blend.

Per-pipeline-call state lives on the control between ``on_call_start`` and ``on_call_end``; the engine calls
both for every pipeline call so nothing leaks between runs. A control is used by one ``apply`` at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ControlError, did_you_mean

if TYPE_CHECKING:
    from ..engine import AttentionCall, LatentUpdate, Session, StepInfo


def listify(value: Any) -> Any:
    """A ``mode="before"`` validator of list options: one string becomes a one-item list (``layers: mid_block``
    means ``layers: [mid_block]``)."""
    return [value] if isinstance(value, str) else value


class StrictOptions(BaseModel):
    """Base for control options: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StepWindow(StrictOptions):
    """A window of the denoising schedule as fractions: 0 = first step, 1 = after the last.

    Fractions, not model-call counts: Heun-type schedulers call the model twice per step and img2img starts
    part-way, and a window still means the same part of the schedule.
    """

    start: float = Field(0.0, ge=0.0, le=1.0)
    stop: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("stop")
    @classmethod
    def _ordered(cls, stop: float, info) -> float:
        start = info.data.get("start", 0.0)
        if stop < start:
            raise ValueError(f"stop ({stop}) must be >= start ({start})")
        return stop

    def contains(self, progress: float) -> bool:
        return self.start <= progress < self.stop or (self.stop >= 1.0 and progress >= 1.0)


class Control:
    """Base class of every control. Subclasses set ``name`` and ``Options`` and override hooks they need."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[StrictOptions]] = StrictOptions
    families: ClassVar[tuple[str, ...]] = ("sd15", "sdxl", "sd3", "flux", "flux2", "chroma", "qwenimage",
                                           "zimage")
    # Why a family outside ``families`` cannot take this control (said in the error).
    family_notes: ClassVar[dict[str, str]] = {}
    takes_all_prompts: ClassVar[bool] = False  # attnctl run: one item per seed holding every prompt
    # Reads the pipeline call's prompt text (word positions, per-sample prompts): the engine learns it from the
    # pipeline's ``encode_prompt``, so on a pipeline without one (diffusers' modular pipelines) the control is
    # an error at the first denoiser call.
    needs_prompt: ClassVar[bool] = False

    def __init__(self, options: StrictOptions | dict | None = None, **kwargs: Any):
        if isinstance(options, self.Options):
            if kwargs:
                options = options.model_copy(update=kwargs)
            self.options = options
        else:
            data = dict(options or {})
            data.update(kwargs)
            try:
                self.options = self.Options(**data)
            except ValidationError as exc:
                raise ControlError(format_validation_error(exc, f"control {self.name!r}",
                                                           self.Options)) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    # -- set-up ------------------------------------------------------------------------------------------
    def bind(self, session: Session) -> dict[str, tuple[int, ...] | None]:
        """Resolve options against the model (selectors, families). Returns the sites to hook: {name: heads}."""
        return {}

    def on_call_start(self, session: Session) -> None:
        """A new pipeline call starts: reset per-call state."""

    def on_call_end(self, session: Session) -> dict:
        """The pipeline call ended: return diagnostics for the run metadata (JSON-serialisable)."""
        return {}

    # -- hooks -------------------------------------------------------------------------------------------
    def on_attention(self, call: AttentionCall) -> None:
        """Edit one attention call of a bound site."""

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        """Names of extra batch branches this control needs at ``step`` (rows copied from the cond rows)."""
        return ()

    def guidance(self, step: StepInfo, preds: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Change to the final noise prediction of the cond rows, from per-branch predictions (cond, ...)."""
        return None

    def wants_latent_update(self, step: StepInfo) -> bool:
        return False

    def update_latents(self, update: LatentUpdate) -> torch.Tensor | None:
        """Return a change for ``update.z`` (one row per sample), or None."""
        return None

    def after_step(self, step: StepInfo, latents: torch.Tensor) -> torch.Tensor | None:
        """After ``scheduler.step`` at ``step``: return new latents (same shape, one row per sample), or None."""
        return None


CONTROLS: dict[str, type[Control]] = {}


def register(cls: type[Control]) -> type[Control]:
    """Class decorator: make a control available by its ``name`` (recipes' ``controls:`` keys)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name")
    CONTROLS[cls.name] = cls
    return cls


def control_class(name: str) -> type[Control]:
    from . import _load_all

    _load_all()
    if name not in CONTROLS:
        raise ControlError(f"unknown control {name!r}; allowed: {', '.join(sorted(CONTROLS))}"
                           + did_you_mean(name, CONTROLS))
    return CONTROLS[name]


def format_validation_error(exc: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    """One line per problem: field path, bad value, what is allowed (and a did-you-mean for unknown keys)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            known = list(model.model_fields) if model is not None else []
            key = str(err["loc"][-1])
            lines.append(f"{where}: unknown key {key!r}{did_you_mean(key, known)}; allowed: {', '.join(known)}")
        else:
            lines.append(f"{where}: {loc} = {value!r}: {err['msg']}")
    return "\n".join(lines)
