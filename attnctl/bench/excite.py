"""``attnctl bench pipeline`` settings for Attend-and-Excite: ours (``cfg+excite``) and diffusers' deprecated
``StableDiffusionAttendAndExcitePipeline`` (``diffusers-excite``, SD1.x only) at equal settings.

Equal settings: the same prompt, subjects (circle, square), steps, CFG, attention grid (the one ``resolution:
auto`` picks: 24x24 at the benchmark's 96 px on tiny SD1.5, given to diffusers as ``attn_res``), altered steps
(the first half), refinement at the steps our default fractions map to inside that window, and the reference's
padded token slice (``softmax_over="padded"``) so that both compute the same loss and refine equally often.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import AttnctlError

SUBJECTS = ["circle", "square"]  # of bench.pipeline.PROMPT, "a red circle and a blue square"


def _options(steps: int) -> dict:
    from ..controls.excite import ExciteOptions

    window = ExciteOptions.model_fields["window"].default_factory()
    thresholds = {at: t for at, t in ExciteOptions.model_fields["thresholds"].default_factory().items()
                  if window.contains(math.ceil(at * steps - 1e-9) / steps)}
    return dict(subjects=SUBJECTS, softmax_over="padded", thresholds=thresholds)


def cfg_excite(ctx) -> Callable[[], object]:
    """Our control on the stock pipeline with CFG."""
    from ..controls.excite import Excite
    from ..engine import apply

    control = Excite(**_options(ctx.steps))

    def generate():
        with apply(ctx.pipe, control):
            return ctx.pipe(**ctx.kwargs(cfg=True))

    return generate


def diffusers_excite(ctx) -> Callable[[], object]:
    """diffusers' deprecated pipeline on the same components, at the settings ``cfg_excite`` uses."""
    if ctx.family != "sd15":
        raise AttnctlError(f"diffusers has an Attend-and-Excite pipeline for SD1.x/2.x only, not {ctx.family}; "
                           "run `attnctl bench pipeline --families sd15 --settings cfg+excite,diffusers-excite`")
    try:
        from diffusers import StableDiffusionAttendAndExcitePipeline
    except ImportError:
        raise AttnctlError("this diffusers no longer ships StableDiffusionAttendAndExcitePipeline") from None

    components = {k: v for k, v in ctx.pipe.components.items() if k != "image_encoder"}
    reference = StableDiffusionAttendAndExcitePipeline(**components, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    options = _options(ctx.steps)
    side = _grid_side(ctx)
    thresholds = {math.ceil(at * ctx.steps - 1e-9): t for at, t in options["thresholds"].items()}
    kwargs = ctx.kwargs(cfg=True)
    ids = ctx.pipe.tokenizer(kwargs["prompt"]).input_ids
    words = ctx.pipe.tokenizer.convert_ids_to_tokens(ids)
    indices = [words.index(w + "</w>") for w in SUBJECTS]

    def generate():
        return reference(**ctx.kwargs(cfg=True), token_indices=indices, attn_res=(side, side),
                         max_iter_to_alter=math.ceil(ctx.steps / 2), thresholds=thresholds)

    return generate


diffusers_excite.families = ("sd15",)  # bench pipeline skips it, with a note, on the other families


def _grid_side(ctx) -> int:
    """The grid ``resolution: auto`` picks at the benchmark size, among the UNet's cross-attention levels."""
    from ..controls.excite import auto_grid

    latent = ctx.height // ctx.pipe.vae_scale_factor
    blocks = ctx.pipe.unet.config.down_block_types
    sides = [latent // 2**i for i, kind in enumerate(blocks) if "CrossAttn" in kind]
    return auto_grid((latent, latent), [(s, s) for s in sides])[0]
