"""A small random Chroma pipeline, built offline (``tiny:chroma``): ``ChromaPipeline`` with a T5 encoder and the
offline T5 tokenizer of ``attnctl.tokenizers``, FLUX-style blocks (one double-, two single-stream) with Chroma's
pruned modulation approximator, and a FLUX-style VAE."""

from __future__ import annotations

from .tokenizers import build_t5_tokenizer


def chroma():
    """The stock ``ChromaPipeline`` with tiny random components (call under ``torch.manual_seed``)."""
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_t5_tokenizer(model_max_length=512)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(2, 2, 4),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
    )
    t5 = T5EncoderModel(T5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=len(tokenizer),
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4, norm_num_groups=4, sample_size=32, shift_factor=0.0609, scaling_factor=1.5035,
    )
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                          text_encoder=t5, tokenizer=tokenizer, transformer=transformer)
