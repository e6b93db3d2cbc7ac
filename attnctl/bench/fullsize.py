"""``attnctl bench fullsize``: one denoiser step of full-size models, each control against the alternatives.

Full size (``--size full``, a CUDA GPU, bfloat16): the denoisers are built from the published configs below
(``FULL``) with random weights, nothing is downloaded. Each family runs at its native resolution:

* ``sdxl``: SDXL base UNet at 1024 px (latent 128x128, cross-attention dim 2048, ``text_time`` embedding);
* ``sd3``: SD3.5-medium MM-DiT at 1024 px (4096 image + 77 CLIP + 256 T5 text tokens);
* ``flux``: FLUX.1-dev transformer at 1024 px (19 double + 38 single blocks, 3072 hidden, 4096 + 512 tokens);
* ``sd15``: SD1.5 UNet at 512 px and ``sd15@1024`` at 1024 px (the SDXL-size latent): the only family that has
  diffusers' Attend-and-Excite pipeline, so the A&E comparison runs there;
* ``flux2``: FLUX.2-klein-4B transformer at 1024 px, only if diffusers has ``Flux2Transformer2DModel``. attnctl
  has no FLUX.2 adapter, so only the plain denoiser is timed (one row and CFG's two calls).

The text encoders are one-layer random stand-ins with the real output widths and sequence lengths (CLIP 768 /
1280, T5 4096 at 256 or 512 tokens): the denoiser sees random text embeddings of the right shape, and controls
that need the prompt's words (regions, Attend-and-Excite) find them. The VAE is never run (latents out).

What is timed: ONE denoiser step. Each timed pipeline call runs a single inference step; CUDA events recorded by
forward hooks on the denoiser mark the first denoiser call's start and the last one's end, so the span holds
every denoiser call of the step (FLUX's true CFG: two), attnctl's work inside them (PAG's extra rows and their
guidance, Attend-and-Excite's gradient step on the latents, which runs inside the wrapped denoiser call) and,
for diffusers' A&E pipeline, its gradient forward, backward and CFG forward. Text encoding, set-up and the
scheduler step are outside. One or more warm-up calls first (compilation, autotuning), then the median of
``repeats`` calls with min and max. Peak memory: ``torch.cuda.max_memory_allocated`` over the timed calls after
a reset, and ``extra_gb``, that peak minus what was allocated before them (the weights and the pipeline).

Settings (the ``SETTINGS`` table; each family runs those it can):

* ``cfg``: the stock pipeline with classifier-free guidance (FLUX: true CFG, two calls; the other families one
  batch of two rows) - the yardstick of every ratio (``vs_cfg``). ``cfg[apply]``: inside ``attnctl.apply``
  with no control. FLUX also ``baseline`` (one row, no CFG, the guidance-distilled way) and ``pag`` (PAG
  without CFG), with ``vs_baseline``.
* ``cfg+pag``: PAG on the family's default layers (``perturb.DEFAULT_LAYERS``), scale 3, u = 1.
  ``cfg+pag[heads]``: the same layers, half of their heads. ``cfg+softpag``: u = 0.5 on half the heads.
  ``diffusers-pag``: diffusers' PAG pipeline (``StableDiffusion[XL|3]PAGPipeline``, its processors, the three
  rows through every block) on the same layers; diffusers has no FLUX PAG pipeline and no head-level or soft PAG.
* ``regions-hard`` / ``regions-soft``: two phrases bound to the left and right halves, every step.
* ``excite``: an Attend-and-Excite altered step (one gradient step on the latents, no iterative refinement:
  ``thresholds: {}``) plus the step's CFG call. ``diffusers-excite``: diffusers' deprecated
  ``StableDiffusionAttendAndExcitePipeline`` at the same settings (SD1.x only: run on ``sd15`` and
  ``sd15@1024``); there is no diffusers A&E for SDXL, SD3 or FLUX.

Tiny size (``--size tiny``, any device, float32 on CPU): the same code with small configs (``TINY``) at 64 px,
a dry run of the GPU benchmark that the default test suite runs in seconds. Numbers at tiny size mean nothing.
This benchmark never asserts on time; ``targets`` reports its performance targets (time ratios against stock
diffusers, each with its bound) as met, missed or not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AttnctlError, did_you_mean

PROMPT = "a red circle and a blue square"
NEGATIVE = "a green triangle"
SUBJECTS = ["circle", "square"]
REGIONS = [{"phrase": "red circle", "box": [0.0, 0.0, 0.5, 1.0]},
           {"phrase": "blue square", "box": [0.5, 0.0, 1.0, 1.0]}]
EVERY_STEP = {"start": 0.0, "stop": 1.0}

# -- configs -------------------------------------------------------------------------------------------------
# Denoiser configs as published in each model's config.json (keys diffusers records about itself left out).
FULL: dict[str, dict] = {
    # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "sdxl": dict(
        act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
        attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
        cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
        mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32,
        out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
        transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        use_linear_projection=True,
    ),
    # stabilityai/stable-diffusion-3.5-medium, transformer/config.json
    "sd3": dict(
        attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=list(range(13)), in_channels=16,
        joint_attention_dim=4096, num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
        pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128,
    ),
    # black-forest-labs/FLUX.1-dev, transformer/config.json
    "flux": dict(
        attention_head_dim=128, axes_dims_rope=[16, 56, 56], guidance_embeds=True, in_channels=64,
        joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
        pooled_projection_dim=768,
    ),
    # stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json
    "sd15": dict(
        act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
        cross_attention_dim=768,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
        mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    ),
    # black-forest-labs/FLUX.2-klein-4B, transformer/config.json
    "flux2": dict(
        attention_head_dim=128, axes_dims_rope=[32, 32, 32, 32], guidance_embeds=False, in_channels=128,
        joint_attention_dim=7680, mlp_ratio=3.0, num_attention_heads=24, num_layers=5, num_single_layers=20,
        patch_size=1, rope_theta=2000, timestep_guidance_channels=256,
    ),
}

TINY: dict[str, dict] = {
    "sdxl": dict(
        addition_embed_type="text_time", addition_time_embed_dim=8, attention_head_dim=[2, 4], block_out_channels=[32, 64],
        cross_attention_dim=64, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
        layers_per_block=1, norm_num_groups=8, out_channels=4, projection_class_embeddings_input_dim=80, sample_size=8,
        transformer_layers_per_block=[1, 2], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        use_linear_projection=True,
    ),
    "sd3": dict(
        attention_head_dim=8, caption_projection_dim=32, dual_attention_layers=[0], in_channels=16,
        joint_attention_dim=64, num_attention_heads=4, num_layers=3, out_channels=16, patch_size=2,
        pooled_projection_dim=64, pos_embed_max_size=16, qk_norm="rms_norm", sample_size=8,
    ),
    "flux": dict(
        attention_head_dim=16, axes_dims_rope=[4, 4, 8], guidance_embeds=True, in_channels=64, joint_attention_dim=32,
        num_attention_heads=2, num_layers=1, num_single_layers=2, patch_size=1, pooled_projection_dim=32,
    ),
    "sd15": dict(
        attention_head_dim=[2, 4], block_out_channels=[32, 64], cross_attention_dim=32,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4, layers_per_block=1,
        norm_num_groups=8, out_channels=4, sample_size=8, up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    ),
    "flux2": dict(
        attention_head_dim=16, axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False, in_channels=16,
        joint_attention_dim=32, mlp_ratio=3.0, num_attention_heads=2, num_layers=1, num_single_layers=1, patch_size=1,
        timestep_guidance_channels=16,
    ),
}

# Text stand-ins: (CLIP hidden widths, CLIP projection widths, T5 width, T5 tokens) per family and size.
TEXT = {
    "full": {"sdxl": ((768, 1280), (None, 1280), None, None), "sd15": ((768,), (None,), None, None),
             "sd3": ((768, 1280), (768, 1280), 4096, 256), "flux": ((768,), (None,), 4096, 512),
             "flux2": ((), (), 7680, 512)},
    "tiny": {"sdxl": ((32, 32), (None, 32), None, None), "sd15": ((32,), (None,), None, None),
             "sd3": ((32, 32), (32, 32), 64, 16), "flux": ((32,), (None,), 32, 32), "flux2": ((), (), 32, 16)},
}


@dataclass(frozen=True)
class Variant:
    """One row group: a family's denoiser at one resolution with the settings that run there."""

    name: str
    family: str
    px: dict  # size -> pixels
    settings: tuple[str, ...]


_PAG = ("cfg+pag", "cfg+pag[heads]", "cfg+softpag")
_REGIONS = ("regions-soft", "regions-hard")
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("sdxl", "sdxl", {"full": 1024, "tiny": 64},
            ("cfg", *_PAG, "diffusers-pag", "excite", *_REGIONS, "cfg[apply]")),
    Variant("flux", "flux", {"full": 1024, "tiny": 64},
            ("baseline", "cfg", "pag", *_PAG, "excite", *_REGIONS, "cfg[apply]")),
    Variant("sd15", "sd15", {"full": 512, "tiny": 64},
            ("cfg", "cfg+pag", "diffusers-pag", "excite", "diffusers-excite")),
    Variant("sd15@1024", "sd15", {"full": 1024, "tiny": 96}, ("cfg", "excite", "diffusers-excite")),
    Variant("sd3", "sd3", {"full": 1024, "tiny": 64},
            ("cfg", *_PAG, "diffusers-pag", "excite", *_REGIONS, "cfg[apply]")),
    Variant("flux2", "flux2", {"full": 1024, "tiny": 64}, ("baseline", "cfg")),
)}

# diffusers' PAG pipelines on the layers of attnctl's defaults (diffusers matches a regex: its SD3 default
# "blocks.1" also matches blocks 10-19, diffusers issue #13594, so the exact block is spelled out).
DIFFUSERS_PAG = {"sd15": ("StableDiffusionPAGPipeline", "mid"), "sdxl": ("StableDiffusionXLPAGPipeline", "mid"),
                 "sd3": ("StableDiffusion3PAGPipeline", r"transformer_blocks\.1\.")}


# -- building pipelines ----------------------------------------------------------------------------------------
def _clip(tokenizer, hidden: int, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64,
                            num_attention_heads=1, num_hidden_layers=1, max_position_embeddings=77,
                            bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
                            pad_token_id=len(tokenizer) - 1, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=width, d_kv=8, d_ff=16, num_layers=1, num_heads=1,
                                   vocab_size=len(tokenizer), relative_attention_num_buckets=8, dropout_rate=0.0,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae(latent_channels: int, **extra):
    """A 4-level (8x downsampling, as every family's real VAE) but narrow VAE: it fixes the pipelines'
    ``vae_scale_factor`` and is never run (the benchmark takes latents out)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1, **extra)


def flux2_available() -> bool:
    try:
        from diffusers import Flux2Transformer2DModel  # noqa: F401
    except ImportError:
        return False
    return True


def build_denoiser(family: str, size: str, device: torch.device, dtype: torch.dtype):
    """The family's denoiser from ``FULL`` or ``TINY`` with random weights, built on ``device``, in ``dtype``."""
    import diffusers

    cls = {"sdxl": "UNet2DConditionModel", "sd15": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel",
           "flux": "FluxTransformer2DModel", "flux2": "Flux2Transformer2DModel"}[family]
    config = (FULL if size == "full" else TINY)[family]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = getattr(diffusers, cls)(**config)
    model.to(device)
    if dtype != torch.float32:
        model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def build_pipeline(family: str, size: str, device: torch.device, dtype: torch.dtype):
    """A stock diffusers pipeline around the full-size (or tiny) denoiser, with text stand-ins (module doc)."""
    import diffusers

    from ..tokenizers import build_clip_tokenizer, build_t5_tokenizer

    clip_widths, projections, t5_width, t5_tokens = TEXT[size][family]
    tokenizer = build_clip_tokenizer()
    denoiser = build_denoiser(family, size, device, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        clips = [_clip(tokenizer, w, p) for w, p in zip(clip_widths, projections)]
        if family == "sd15":
            pipe = diffusers.StableDiffusionPipeline(
                unet=denoiser, vae=_vae(4), text_encoder=clips[0], tokenizer=tokenizer,
                scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
        elif family == "sdxl":
            pipe = diffusers.StableDiffusionXLPipeline(
                unet=denoiser, vae=_vae(4), text_encoder=clips[0], text_encoder_2=clips[1], tokenizer=tokenizer,
                tokenizer_2=tokenizer, image_encoder=None, feature_extractor=None,
                scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012, steps_offset=1,
                                                           timestep_spacing="leading"))
        elif family == "sd3":
            pipe = diffusers.StableDiffusion3Pipeline(
                transformer=denoiser, vae=_vae(16, shift_factor=0.0609, scaling_factor=1.5035),
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=clips[0],
                tokenizer=tokenizer, text_encoder_2=clips[1], tokenizer_2=tokenizer, text_encoder_3=None,
                tokenizer_3=None)  # no T5: the pipeline feeds zeros of T5's shape (256 tokens x 4096)
        elif family == "flux":
            t5_tokenizer = build_t5_tokenizer(model_max_length=t5_tokens)
            pipe = diffusers.FluxPipeline(
                transformer=denoiser, vae=_vae(16, shift_factor=0.1159, scaling_factor=0.3611),
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder=clips[0], tokenizer=tokenizer,
                text_encoder_2=_t5(t5_tokenizer, t5_width), tokenizer_2=t5_tokenizer)
        else:
            raise AttnctlError(f"no pipeline for {family!r}")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and component is not denoiser:
            component.to(device)
            if dtype != torch.float32:
                component.to(dtype=dtype)
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- timing ------------------------------------------------------------------------------------------------------
class StepClock:
    """Marks the first denoiser call's start and the last one's end in a pipeline call (forward hooks), with CUDA
    events on a GPU (no synchronisation inside the step) and ``perf_counter`` elsewhere."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = self.end = None
        self.calls = 0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, module, args):
        self.calls += 1
        if self.start is None:
            self.start = self._mark()

    def _post(self, module, args, output):
        self.end = self._mark()

    def reset(self) -> None:
        self.start = self.end = None
        self.calls = 0

    def elapsed_ms(self) -> float:
        if self.start is None or self.end is None:
            raise AttnctlError("the denoiser never ran in this call")
        if self.cuda:
            torch.cuda.synchronize()
            return self.start.elapsed_time(self.end)
        return (self.end - self.start) * 1e3

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class Context:
    """What a setting needs: the variant, its pipeline (or bare denoiser: ``flux2``) and one call's arguments."""

    variant: Variant
    size: str
    device: torch.device
    dtype: torch.dtype
    pipe: object = None
    denoiser: torch.nn.Module = None
    extra: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.variant.family

    @property
    def px(self) -> int:
        return self.variant.px[self.size]

    def kwargs(self, cfg: bool = True) -> dict:
        kwargs = dict(prompt=PROMPT, height=self.px, width=self.px, num_inference_steps=1, output_type="latent",
                      generator=torch.Generator("cpu").manual_seed(0))
        if self.family == "flux":  # guidance-distilled FLUX.1-dev; CFG means true CFG with a negative prompt
            kwargs.update(guidance_scale=3.5, max_sequence_length=TEXT[self.size]["flux"][3])
            if cfg:
                kwargs.update(true_cfg_scale=4.0, negative_prompt=NEGATIVE)
        else:
            kwargs["guidance_scale"] = 5.0 if cfg else 1.0
        return kwargs


def _half_heads(ctx: Context, layer: str) -> str:
    """``layer:heads=0-(H/2 - 1)`` for the number of heads H of the first attention module under ``layer``."""
    module = ctx.pipe.unet if hasattr(ctx.pipe, "unet") else ctx.pipe.transformer
    for sub in module.get_submodule(layer).modules():
        heads = getattr(sub, "heads", None)
        if isinstance(heads, int) and hasattr(sub, "to_q"):
            return f"{layer}:heads=0-{max(1, heads // 2) - 1}"
    raise AttnctlError(f"no attention module under {layer!r}")


def _under(controls, share_prefix: bool = True, cfg: bool = True):
    def make(ctx: Context):
        from ..engine import apply

        built = controls(ctx)

        def generate():
            with apply(ctx.pipe, built, share_prefix=share_prefix):
                return ctx.pipe(**ctx.kwargs(cfg=cfg))

        return generate

    return make


def _perturb(heads: bool, u: float):
    def controls(ctx: Context):
        from ..controls.perturb import DEFAULT_LAYERS, Perturb

        layers = DEFAULT_LAYERS[ctx.family]
        if heads:
            layers = [_half_heads(ctx, layer) for layer in layers]
        return [Perturb(scale=3.0, layers=layers, u=u, window=EVERY_STEP)]

    return controls


def _regions(mode: str):
    def controls(ctx: Context):
        from ..controls.regions import Regions

        return [Regions(regions=REGIONS, mode=mode, window=EVERY_STEP)]

    return controls


def _grid_side(ctx: Context) -> int:
    """The grid ``resolution: auto`` picks for a UNet at this size (given to diffusers' A&E as ``attn_res``)."""
    from ..controls.excite import auto_grid

    latent = ctx.px // ctx.pipe.vae_scale_factor
    blocks = ctx.pipe.unet.config.down_block_types
    sides = [latent // 2**i for i, kind in enumerate(blocks) if "CrossAttn" in kind]
    return auto_grid((latent, latent), [(s, s) for s in sides])[0]


def _excite(ctx: Context):
    from ..controls.excite import Excite

    options = dict(subjects=SUBJECTS, thresholds={}, window=EVERY_STEP)
    if ctx.family == "sd15":  # equal settings with diffusers' pipeline: its padded token slice and its grid
        options.update(softmax_over="padded", resolution=_grid_side(ctx))
    return [Excite(**options)]


def _stock(cfg: bool):
    def make(ctx: Context):
        return lambda: ctx.pipe(**ctx.kwargs(cfg=cfg))

    return make


def _diffusers_pag(ctx: Context):
    import diffusers

    name, layers = DIFFUSERS_PAG[ctx.family]
    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in ctx.pipe.components.items() if k in accepted}
    extra = {"requires_safety_checker": False} if "requires_safety_checker" in accepted else {}
    pipe = cls(**components, pag_applied_layers=[layers], **extra)
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(**ctx.kwargs(cfg=True), pag_scale=3.0, pag_adaptive_scale=0.0)


def _diffusers_excite(ctx: Context):
    from diffusers import StableDiffusionAttendAndExcitePipeline

    components = {k: v for k, v in ctx.pipe.components.items() if k != "image_encoder"}
    pipe = StableDiffusionAttendAndExcitePipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    words = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(PROMPT).input_ids)
    indices = [words.index(w + "</w>") for w in SUBJECTS]
    side = _grid_side(ctx)
    return lambda: pipe(**ctx.kwargs(cfg=True), token_indices=indices, attn_res=(side, side), max_iter_to_alter=1,
                        thresholds={})


def _bare(batch_calls: int):
    """FLUX.2: the denoiser alone (attnctl has no FLUX.2 adapter), one call (no CFG) or two (CFG's, as diffusers'
    Flux2KleinPipeline runs them: cond, then uncond), each on one row."""

    def make(ctx: Context):
        _, _, width, tokens = TEXT[ctx.size]["flux2"]
        side = ctx.px // 16  # FLUX.2: 8x VAE, 2x2 packing
        g = torch.Generator("cpu").manual_seed(0)
        channels = ctx.denoiser.config.in_channels
        latents = torch.randn(1, side * side, channels, generator=g).to(ctx.device, ctx.dtype)
        text = torch.randn(1, tokens, width, generator=g).to(ctx.device, ctx.dtype)
        grid = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
        img_ids = grid[None].to(ctx.device)
        txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                                       torch.arange(tokens))[None].to(ctx.device)
        t = torch.full((1,), 0.5, device=ctx.device, dtype=ctx.dtype)

        @torch.no_grad()
        def generate():
            for _ in range(batch_calls):
                ctx.denoiser(hidden_states=latents, encoder_hidden_states=text, timestep=t, img_ids=img_ids,
                             txt_ids=txt_ids, guidance=None, return_dict=False)

        return generate

    return make


SETTINGS: dict[str, Callable[[Context], Callable[[], object]]] = {
    "baseline": _stock(cfg=False),
    "cfg": _stock(cfg=True),
    "cfg[apply]": _under(lambda ctx: []),
    "pag": _under(_perturb(False, 1.0), cfg=False),
    "cfg+pag": _under(_perturb(False, 1.0)),
    "cfg+pag[heads]": _under(_perturb(True, 1.0)),
    "cfg+softpag": _under(_perturb(True, 0.5)),
    "diffusers-pag": _diffusers_pag,
    "regions-soft": _under(_regions("soft")),
    "regions-hard": _under(_regions("hard")),
    "excite": _under(_excite),
    "diffusers-excite": _diffusers_excite,
}
BARE = {"baseline": _bare(1), "cfg": _bare(2)}  # flux2


# -- running -------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(ctx: Context, name: str, repeats: int, warmup: int) -> dict:
    make = BARE[name] if ctx.family == "flux2" else SETTINGS[name]
    generate = make(ctx)
    module = ctx.denoiser if ctx.family == "flux2" else (ctx.pipe.unet if hasattr(ctx.pipe, "unet")
                                                         else ctx.pipe.transformer)
    clock = StepClock(module, ctx.device)
    cuda = ctx.device.type == "cuda"
    try:
        for _ in range(warmup):  # 0 in the dry run: one call per setting
            clock.reset()
            generate()
        _sync(ctx.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times, calls = [], 0
        for _ in range(max(1, repeats)):
            clock.reset()
            generate()
            times.append(clock.elapsed_ms())
            calls = clock.calls
        row = {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "runs": len(times),
               "denoiser_calls": calls}
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            row.update(peak_gb=peak / 2**30, extra_gb=(peak - base) / 2**30)
        return row
    finally:
        clock.close()
        del generate
        _free(ctx.device)


def settings_for(variant: Variant, chosen=None) -> list[str]:
    names = list(variant.settings)
    if chosen:
        names = [s for s in names if s in chosen]
    return names


def run_fullsize(size: str = "full", device: str = "auto", dtype: str = "auto", variants=None, settings=None,
                 repeats: int = 5, warmup: int = 2, budget_s: float | None = None, json_path: str | None = None,
                 command: str | None = None, verbose: bool = True) -> dict:
    """Run the benchmark; returns (and writes to ``json_path`` after every variant) the report dict."""
    from ..models import resolve_device, resolve_dtype

    if size not in ("full", "tiny"):
        raise AttnctlError(f"unknown size {size!r}; allowed: full, tiny")
    target = resolve_device(device)
    if size == "full" and target.type != "cuda":
        raise AttnctlError("--size full builds SDXL/SD3.5/FLUX-size denoisers: it needs a CUDA GPU "
                           "(use --size tiny --device cpu for the dry run)")
    torch_dtype = resolve_dtype("bfloat16" if dtype == "auto" and target.type == "cuda" else
                                ("float32" if dtype == "auto" else dtype), target)
    names = list(variants or VARIANTS)
    for name in names:
        if name not in VARIANTS:
            raise AttnctlError(f"unknown variant {name!r}{did_you_mean(name, VARIANTS)}; allowed: {', '.join(VARIANTS)}")
    for name in settings or ():
        if name not in SETTINGS:
            raise AttnctlError(f"unknown setting {name!r}{did_you_mean(name, SETTINGS)}; allowed: {', '.join(SETTINGS)}")
    report = {"benchmark": "attnctl bench fullsize", "size": size, "dtype": str(torch_dtype).replace("torch.", ""),
              "device": torch.cuda.get_device_name(target) if target.type == "cuda" else platform.processor() or "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "command": command or " ".join([os.path.basename(sys.executable)] + sys.argv),
              "versions": _versions(), "repeats": repeats, "warmup": warmup, "configs": "attnctl/bench/fullsize.py "
              "FULL (published config.json values)" if size == "full" else "attnctl/bench/fullsize.py TINY",
              "rows": [], "notes": []}
    started = time.perf_counter()
    for name in names:
        variant = VARIANTS[name]
        chosen = settings_for(variant, settings)
        if not chosen:
            continue
        if variant.family == "flux2" and not flux2_available():
            report["notes"].append("flux2: this diffusers has no Flux2Transformer2DModel; skipped")
            continue
        if budget_s is not None and time.perf_counter() - started > budget_s:
            report["notes"].append(f"{name}: skipped, the time budget ({budget_s:.0f} s) was spent")
            continue
        t0 = time.perf_counter()
        ctx = Context(variant, size, target, torch_dtype)
        try:
            if variant.family == "flux2":
                ctx.denoiser = build_denoiser("flux2", size, target, torch_dtype)
            else:
                ctx.pipe = build_pipeline(variant.family, size, target, torch_dtype)
        except Exception as exc:  # e.g. out of memory: report, go on
            report["notes"].append(f"{name}: could not build ({type(exc).__name__}: {str(exc)[:300]})")
            _free(target)
            continue
        module = ctx.denoiser if ctx.denoiser is not None else (ctx.pipe.unet if hasattr(ctx.pipe, "unet")
                                                                 else ctx.pipe.transformer)
        params = sum(p.numel() for p in module.parameters())
        build_s = time.perf_counter() - t0
        if verbose:
            print(f"[{name}] {params / 1e9:.2f}B parameters, built in {build_s:.1f} s", flush=True)
        for setting in chosen:
            if budget_s is not None and time.perf_counter() - started > budget_s:
                report["notes"].append(f"{name}/{setting}: skipped, the time budget ({budget_s:.0f} s) was spent")
                continue
            row = {"variant": name, "setting": setting, "px": ctx.px, "params_b": params / 1e9}
            try:
                row.update(_measure(ctx, setting, repeats, warmup))
            except Exception as exc:  # OOM, a diffusers pipeline that breaks: a row saying so
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                _free(target)
            report["rows"].append(row)
            if verbose:
                print(f"[{name}] {setting}: " + (f"{row['ms']:.2f} ms" if "ms" in row else row["error"]), flush=True)
        del ctx, module
        _free(target)
        _ratios(report["rows"])
        report["targets"] = targets(report["rows"], size)
        report["elapsed_s"] = time.perf_counter() - started
        if json_path:
            _write(json_path, report)
    _ratios(report["rows"])
    report["targets"] = targets(report["rows"], size)
    report["elapsed_s"] = time.perf_counter() - started
    if json_path:
        _write(json_path, report)
    return report


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda}
    for name in ("diffusers", "transformers", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def _write(path: str, report: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(target)


def _ratios(rows: list[dict]) -> None:
    by = {(r["variant"], r["setting"]): r.get("ms") for r in rows}
    for r in rows:
        for key, ref in (("vs_cfg", "cfg"), ("vs_baseline", "baseline")):
            base = by.get((r["variant"], ref))
            if base and r.get("ms") is not None:
                r[key] = r["ms"] / base


def targets(rows: list[dict], size: str = "full") -> list[dict]:
    """The performance targets this benchmark reports (never asserts): each with its value, the bound and met /
    missed / not measured (at tiny size: "n/a (tiny)", the numbers of a dry run mean nothing)."""
    get = {(r["variant"], r["setting"]): r for r in rows}
    out = []

    def ratio(a, b, key="ms"):
        x, y = get.get(a, {}).get(key), get.get(b, {}).get(key)
        return x / y if x is not None and y else None

    def add(name, value, bound, met=None):
        if met is None and value is not None:
            met = value <= bound
        status = "not measured" if value is None else ("met" if met else "missed")
        out.append({"target": name, "value": value, "bound": bound,
                    "status": status if size == "full" else "n/a (tiny)"})

    for v in ("sdxl", "flux"):
        add(f"{v}: CFG+PAG step <= 1.35x CFG step", ratio((v, "cfg+pag"), (v, "cfg")), 1.35)
    add("flux: PAG step <= 1.35x no-CFG step (guidance-distilled use)", ratio(("flux", "pag"), ("flux", "baseline")),
        1.35)
    for v in ("sd15", "sd15@1024"):
        add(f"{v}: A&E altered step faster than diffusers' A&E (ratio < 1)",
            ratio((v, "excite"), (v, "diffusers-excite")), 1.0)
        add(f"{v}: A&E altered step lower peak memory than diffusers' A&E (ratio < 1)",
            ratio((v, "excite"), (v, "diffusers-excite"), "peak_gb"), 1.0)
    for v in ("sdxl", "sd3", "flux"):
        add(f"{v}: soft regions step <= 1.2x unmasked (CFG) step", ratio((v, "regions-soft"), (v, "cfg")), 1.2)
    return out


# -- printing ------------------------------------------------------------------------------------------------------
COLUMNS = ["variant", "setting", "px", "ms", "ms_min", "ms_max", "vs_cfg", "vs_baseline", "peak_gb", "extra_gb",
           "denoiser_calls"]


def print_report(report: dict, file=None) -> None:
    from . import print_table

    out = file or sys.stdout
    with contextlib.redirect_stdout(out):
        print(f"# attnctl bench fullsize: {report['device']}, {report['dtype']}, {report['size']} size, "
              f"{report['date']}")
        print(f"# command: {report['command']}")
        print("# versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
        print("# ms: one denoiser step (median of the timed calls); vs_cfg: against the stock CFG step; "
              "extra_gb: peak over what was allocated before")
        rows = [{c: r.get(c, "") for c in COLUMNS} | ({"ms": "ERROR " + r["error"]} if "error" in r else {})
                for r in report["rows"]]
        print_table(rows, COLUMNS)
        if report.get("targets"):
            print()
            print_table([{k: t[k] for k in ("target", "value", "bound", "status")} for t in report["targets"]],
                        ["target", "value", "bound", "status"])
        for note in report.get("notes", []):
            print(f"note: {note}")


def run(repeats: int = 5, families=None, quick: bool = False, settings=None):
    """``attnctl bench fullsize`` (registry entry): full size on the GPU, ``--quick``: tiny size, 1 repeat."""
    report = run_fullsize(size="tiny" if quick else "full", variants=families, settings=settings,
                          repeats=1 if quick else repeats, warmup=0 if quick else 2, verbose=False)
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return report["rows"], COLUMNS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnctl.bench.fullsize", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU), bf16, fp16, fp32")
    parser.add_argument("--variants", default=None, help=f"comma-separated (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--settings", default=None, help=f"comma-separated (default all: {', '.join(SETTINGS)})")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=None, help="skip what is left after this many seconds")
    parser.add_argument("--json", default=None, help="write the report here (after every variant)")
    parser.add_argument("--table", default=None, help="also write the printed table here")
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" per component, etc.
    command = "python -m attnctl.bench.fullsize " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        report = run_fullsize(size=args.size, device=args.device, dtype=args.dtype,
                              variants=args.variants.split(",") if args.variants else None,
                              settings=args.settings.split(",") if args.settings else None,
                              repeats=args.repeats, warmup=args.warmup, budget_s=args.budget_s,
                              json_path=args.json, command=command.strip())
    except AttnctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    if args.table:
        with open(args.table, "w") as handle:
            print_report(report, file=handle)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
