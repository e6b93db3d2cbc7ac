"""Tiny offline pipelines of the Qwen-Image and Z-Image families, and the Qwen tokenizer they need.

Both families encode prompts with a Qwen language model (Qwen-Image: Qwen2.5-VL, Z-Image: Qwen3) whose byte-level
BPE tokenizer cannot be downloaded here. ``qwen_tokenizer`` makes a ``Qwen2Tokenizer`` from a word list
(``attnctl.tokenizers.build_qwen_tokenizer``): each
word is one token (with and without the leading space byte, ``"Ġcat"`` and ``"cat"``), every other text still
tokenizes through the 256 byte symbols, and ``<|im_start|>``/``<|im_end|>`` are special tokens. The words
include those of Qwen-Image's prompt template, whose system prefix the pipeline drops by a fixed count of 34
tokens (``prompt_template_encode_start_idx``): with this tokenizer that prefix is 34 tokens too, as with the real
one. The chat template is the one Z-Image's pipeline calls (``apply_chat_template`` with a generation prompt):
``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``.

``attnctl.testing.tiny_pipeline("qwenimage" | "zimage")`` builds these; the builders live here so that the
family's pieces stay in one file.
"""

from __future__ import annotations

from .tokenizers import DEFAULT_WORDS, build_qwen_tokenizer

# Qwen-Image's prompt template (pipeline_qwenimage.py: prompt_template_encode), word by word.
QWEN_TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text spatial "
    "relationships of objects and background"
).split()

# Z-Image's pipeline renders each prompt through the tokenizer's chat template (Qwen3's, generation prompt on).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """The Qwen tokenizer of both tiny pipelines: ``DEFAULT_WORDS`` and Qwen-Image's template words, the chat
    template above, the bare form's merges before the spaced form's, ``<|endoftext|>`` its end token."""
    return build_qwen_tokenizer(tuple(DEFAULT_WORDS) + tuple(QWEN_TEMPLATE_WORDS), chat_template=QWEN_CHAT_TEMPLATE,
                                model_max_length=4096, spaced_first=False, list_chat_tokens=False)


def tiny_qwenimage(tokenizer=None):
    """A random ``QwenImagePipeline``: 2 double-stream blocks of 4 heads x 8 dims, a 2-layer Qwen2.5-VL text
    encoder, a 2-level Qwen-Image VAE (latents 1/4 of the pixels, packed 2x2). Run it at 32x32 pixels."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tokenizer or qwen_tokenizer()
    z_dim = 4
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
    )
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0])
    special = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    text_config.update(bos_token_id=special[0], eos_token_id=special[1], pad_token_id=special[0])
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, vocab_size=len(tokenizer),
                              hidden_size=32)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def tiny_zimage(tokenizer=None):
    """A random ``ZImagePipeline``: 2 main single-stream layers and 1 image / 1 caption refiner layer, 4 heads x 8
    dims, a 2-layer Qwen3 text encoder, a 2-level VAE (latents 1/2 of the pixels, patchified 2x2 by the
    transformer). Run it at 32x32 pixels (8x8 image tokens)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tokenizer or qwen_tokenizer()
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=pad,
    ))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=4, n_kv_heads=4, cap_feat_dim=16, axes_dims=[2, 2, 4], axes_lens=[1024, 64, 64],
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, norm_num_groups=4,
        sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
