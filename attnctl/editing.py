"""One call for an edit: source (generated from a seed, or a real image inverted) -> source, target and mask.

``edit(pipe, "a red circle", "a blue circle", seed=3)`` generates both rows in one pipeline call from the same
initial noise, with the ``edit`` control coupling them. With ``image=...`` the source is a real image: it is
inverted under the source prompt (``attnctl.inversion``) and both rows start from the inverted latent. Returns
an ``EditResult`` with PIL images and the blend mask at pixel resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .controls.edit import Edit, EditOptions
from .engine import apply


@dataclass
class EditResult:
    """``source``/``target``: PIL images; ``mask``: float (H, W) in [0, 1] (None without local blend)."""

    source: object
    target: object
    mask: np.ndarray | None
    diagnostics: dict = field(default_factory=dict)
    inversion: object | None = None

    def mask_image(self):
        from PIL import Image

        if self.mask is None:
            return None
        return Image.fromarray((np.clip(self.mask, 0, 1) * 255).round().astype(np.uint8), "L")


def mask_to_pixels(mask: torch.Tensor | None, height: int, width: int) -> np.ndarray | None:
    """An (h, w) mask at the attention grid -> float (height, width), nearest-neighbour."""
    if mask is None:
        return None
    return F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0].numpy()


def edit_control(options: EditOptions | dict | Edit | None = None, mask=None) -> Edit:
    if isinstance(options, Edit):
        return options
    return Edit(options, mask=mask)


def edit(pipe, source_prompt: str, target_prompt: str, *, image=None, seed: int = 0, steps: int = 25,
         guidance_scale: float = 5.0, height: int | None = None, width: int | None = None,
         options: EditOptions | dict | Edit | None = None, mask=None, inversion_options: dict | None = None,
         apply_controls: bool = True, **call_kwargs) -> EditResult:
    """Edit a generated (``seed``) or real (``image``) source from ``source_prompt`` to ``target_prompt``.

    ``options``: the edit control's options (or an ``Edit`` control); ``mask``: a user blend mask (H, W), white =
    editable. ``apply_controls=False`` is for callers that already run inside ``attnctl.apply`` with an ``Edit``
    control (``attnctl run``): then ``options`` must be that control.
    """
    from .inversion import invert, native_size, use_scheduler

    control = edit_control(options, mask)
    default_h, default_w = native_size(pipe)
    height, width = height or default_h, width or default_w
    prompts = [source_prompt, target_prompt]
    inversion = None
    scheduler = None
    if image is not None:
        with control.suspended():  # inside `attnctl run` the control is already applied
            inversion = invert(pipe, image, source_prompt, steps, guidance_scale=guidance_scale, height=height,
                               width=width, **(inversion_options or {}), **call_kwargs)
        # the inversion holds ``call_kwargs`` already, merged with its null-text fix (the source row's negative
        # prompt is the source prompt): updating with them again would undo that fix
        kwargs = inversion.generate_kwargs(prompts)
        scheduler = inversion.scheduler
    else:
        kwargs = dict(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=height,
                      width=width, generator=[torch.Generator("cpu").manual_seed(seed) for _ in prompts])
        kwargs.update(call_kwargs)
    kwargs.setdefault("output_type", "pil")
    with use_scheduler(pipe, scheduler):
        if apply_controls:
            with apply(pipe, control) as session:
                images = pipe(**kwargs).images
                diagnostics = session.last_run().get("controls", {}).get("edit", {})
        else:
            images = pipe(**kwargs).images
            diagnostics = {}
    mask = mask_to_pixels(control.masks.get(1), height, width)
    return EditResult(images[0], images[1], mask, diagnostics, inversion)
