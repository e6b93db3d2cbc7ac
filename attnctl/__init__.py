"""attnctl: attention control for diffusers pipelines (SD1.5, SDXL, SD3, FLUX).

    import attnctl
    pipe = attnctl.load("tiny:sd15")            # or any diffusers pipeline you already have
    with attnctl.apply(pipe, [attnctl.controls.Maps(words=["circle"])]) as session:
        image = pipe("a red circle").images[0]
"""

from . import controls
from .engine import AttentionCall, BatchLayout, LatentUpdate, Session, StepInfo, apply
from .errors import (AttnctlError, ControlError, LayoutError, ModelError, ProcessorError, RecipeError,
                     SelectorError, TokenError)
from .models import load
from .select import select

__version__ = "0.1.0"

__all__ = [
    "AttentionCall", "AttnctlError", "BatchLayout", "ControlError", "LatentUpdate", "LayoutError", "ModelError",
    "ProcessorError", "RecipeError", "SelectorError", "Session", "StepInfo", "TokenError", "apply", "controls",
    "load", "select",
]
