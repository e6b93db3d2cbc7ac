"""Small random pipelines of every supported family, built offline from configs.

``tiny_pipeline("sd15" | "sdxl" | "sd3" | "flux")`` returns a stock diffusers pipeline whose components are
random, tiny and deterministic for a seed. They have several heads per attention layer (so head addressing can
be tested), FLUX.2 is [klein] with real CFG and [dev] (``flux2-dev``, a Mistral3 text encoder, guidance-distilled)
(``attnctl.testing_flux2``), SD3 includes SD3.5's features (qk-norm and a dual-attention block), FLUX has double- and
single-stream blocks and guidance embedding (a guidance-distilled, FLUX.1-dev-like layout). Users can import
these for their own tests; the model strings ``tiny:sd15`` ... resolve here.
"""

from __future__ import annotations

import torch

from .errors import ModelError
from .tokenizers import build_clip_tokenizer, build_t5_tokenizer

TINY_FAMILIES = ("sd15", "sdxl", "sd3", "flux", "flux2", "flux2-dev", "chroma", "qwenimage", "zimage")

# Tiny pipelines named after their pipeline rather than their adapter family (``tiny:flux2-dev`` is a FLUX.2 one).
TINY_ADAPTER_FAMILY = {"flux2-dev": "flux2"}

# Sizes the tiny pipelines are meant to run at (pixels); any multiple of 16 works.
TINY_SIZE = {"sd15": 32, "sdxl": 32, "sd3": 32, "flux": 32, "flux2": 32, "flux2-dev": 32, "chroma": 32,
             "qwenimage": 32, "zimage": 32}


def _clip_config(vocab_size: int, hidden: int = 32, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kwargs = dict(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **extra,
    )


def _sd15(tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),  # diffusers' legacy name: the number of heads per level
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=_vae(), text_encoder=CLIPTextModel(_clip_config(len(tokenizer))), tokenizer=tokenizer,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )


def _sdxl(tokenizer):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        unet=unet, vae=_vae(), scheduler=scheduler,
        text_encoder=CLIPTextModel(_clip_config(len(tokenizer))), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(len(tokenizer), projection_dim=32)),
        tokenizer_2=tokenizer, image_encoder=None, feature_extractor=None,
    )


def _sd3(tokenizer):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=64,
        dual_attention_layers=(0,),  # SD3.5: an extra image-only self-attention in block 0
        qk_norm="rms_norm",  # SD3.5
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(_clip_config(len(tokenizer), projection_dim=32)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(len(tokenizer), projection_dim=32)),
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )


def _flux(tokenizer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    t5_tokenizer = build_t5_tokenizer(model_max_length=512)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # FLUX.1-dev style: guidance-distilled, no CFG batch
        axes_dims_rope=(4, 4, 8),
    )
    t5 = T5EncoderModel(T5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=len(t5_tokenizer),
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    return FluxPipeline(
        transformer=transformer, vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=CLIPTextModel(_clip_config(len(tokenizer))), tokenizer=tokenizer,
        text_encoder_2=t5, tokenizer_2=t5_tokenizer,
    )


def _flux2(tokenizer):
    from .testing_flux2 import flux2_klein  # FLUX.2 [klein] with a Qwen3 text encoder: its own tokenizer

    return flux2_klein()


def _flux2_dev(tokenizer):
    from .testing_flux2 import flux2_dev  # FLUX.2 [dev] with a Mistral3 text encoder: its own tokenizer

    return flux2_dev()


def _chroma(tokenizer):
    from .testing_chroma import chroma  # T5 only: its own tokenizer

    return chroma()


def _qwenimage(tokenizer):
    from .testing_qwenimage import tiny_qwenimage  # a Qwen2.5-VL text encoder: its own tokenizer

    return tiny_qwenimage()


def _zimage(tokenizer):
    from .testing_qwenimage import tiny_zimage  # a Qwen3 text encoder: the Qwen tokenizer

    return tiny_zimage()


_BUILDERS = {"sd15": _sd15, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "flux2": _flux2, "flux2-dev": _flux2_dev,
             "chroma": _chroma, "qwenimage": _qwenimage, "zimage": _zimage}


def tiny_pipeline(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random tiny pipeline of ``family`` (one of ``TINY_FAMILIES``), in eval mode, on CPU.

    The same ``seed`` gives the same weights. Run it at ``TINY_SIZE[family]`` pixels with a few steps.
    """
    if family not in _BUILDERS:
        raise ModelError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[family](build_clip_tokenizer())
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # configs build modules in train mode; T5 dropout would make runs differ
            if dtype != torch.float32:
                component.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_call_kwargs(family: str, steps: int = 3, seed: int = 0, **overrides) -> dict:
    """Keyword arguments for a fast, deterministic call of ``tiny_pipeline(family)``."""
    size = TINY_SIZE[family]
    kwargs = dict(
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="latent",
    )
    if family == "flux":
        kwargs["max_sequence_length"] = 32
        kwargs["guidance_scale"] = 3.5
    elif family == "chroma":
        kwargs["max_sequence_length"] = 32
        kwargs["guidance_scale"] = 4.0
    elif family == "flux2":
        kwargs["max_sequence_length"] = 32  # the chat turn's 14 tokens + the prompt + padding
        kwargs["guidance_scale"] = 4.0
    elif family == "flux2-dev":  # guidance-distilled: the scale goes into the guidance embedding, one call per step
        kwargs["max_sequence_length"] = 48  # the system message's 31 tokens + the user turn + padding
        kwargs["guidance_scale"] = 4.0
    elif family == "qwenimage":  # one call per step; true CFG (negative_prompt, true_cfg_scale > 1) adds a second
        kwargs.update(guidance_scale=None, true_cfg_scale=1.0)  # not guidance-distilled
    elif family == "zimage":  # CFG in one [cond; uncond] batch (Z-Image-Turbo: guidance_scale=0, no CFG)
        kwargs.update(guidance_scale=4.0, max_sequence_length=64)
    else:
        kwargs["guidance_scale"] = 5.0
    kwargs.update(overrides)
    return kwargs
