"""A small random FLUX.2 [klein] pipeline, built offline (``tiny:flux2``).

``Flux2KleinPipeline`` (diffusers' pipeline for FLUX.2 [klein]): a Qwen3 causal LM whose hidden states at three
layers are stacked into the prompt embeddings, the FLUX.2 MM-DiT (double-stream blocks with ``Flux2Attention``,
single-stream blocks with the fused ``Flux2ParallelSelfAttention``, 4-axis RoPE, shared modulation) and the
FLUX.2 VAE (2x2-patchified latents with batch-norm statistics). ``is_distilled=False`` is the [klein] base
layout: real CFG as a second transformer call (``cache_context("uncond")``), like FLUX's true CFG. The text
encoder has 27 layers so the pipeline's default ``text_encoder_out_layers=(9, 18, 27)`` works unchanged.

The tokenizer is a byte-level BPE (``Qwen2Tokenizer``) built from a word list: each word of
``attnctl.tokenizers.DEFAULT_WORDS`` is one token after a space (``"Ġcircle"``) and at the start of a text, and
a small chat template puts the prompt in a user turn, as Qwen3's does.
"""

from __future__ import annotations

from .tokenizers import DEFAULT_WORDS, build_qwen_tokenizer

# The chat turns FLUX.2 [klein] wraps a prompt in (``apply_chat_template(..., enable_thinking=False)``).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def flux2_tokenizer():
    """The Qwen tokenizer of ``tiny:flux2``: ``DEFAULT_WORDS``, the chat template above, the spaced form's merges
    before the bare form's, ``<|im_end|>`` its end token and the chat tokens listed as special."""
    return build_qwen_tokenizer(DEFAULT_WORDS, chat_template=QWEN_CHAT_TEMPLATE, model_max_length=512,
                                spaced_first=True, eos_token="<|im_end|>", list_chat_tokens=True)


def flux2_klein(tokenizer=None):
    """The stock ``Flux2KleinPipeline`` with tiny random components (call under ``torch.manual_seed``)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tokenizer or flux2_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=27,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    ))
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels patchified 2x2
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=48,  # 3 stacked hidden states of the 16-wide text encoder
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=False,  # [klein]: no guidance embedding; CFG is a second call
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
