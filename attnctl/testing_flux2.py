"""Small random FLUX.2 pipelines, built offline: [klein] (``tiny:flux2``), [dev] (``tiny:flux2-dev``), [klein] KV.

``Flux2KleinPipeline`` (diffusers' pipeline for FLUX.2 [klein]): a Qwen3 causal LM whose hidden states at three
layers are stacked into the prompt embeddings, the FLUX.2 MM-DiT (double-stream blocks with ``Flux2Attention``,
single-stream blocks with the fused ``Flux2ParallelSelfAttention``, 4-axis RoPE, shared modulation) and the
FLUX.2 VAE (2x2-patchified latents with batch-norm statistics). ``is_distilled=False`` is the [klein] base
layout: real CFG as a second transformer call (``cache_context("uncond")``), like FLUX's true CFG. The text
encoder has 27 layers so the pipeline's default ``text_encoder_out_layers=(9, 18, 27)`` works unchanged.

The tokenizer is a byte-level BPE (``Qwen2Tokenizer``) built from a word list: each word of
``attnctl.tokenizers.DEFAULT_WORDS`` is one token after a space (``"Ġcircle"``) and at the start of a text, and
a small chat template puts the prompt in a user turn, as Qwen3's does.

``Flux2Pipeline`` (FLUX.2 [dev]): a ``Mistral3ForConditionalGeneration`` text encoder (a 30-layer Mistral language
model, so the default ``text_encoder_out_layers=(10, 20, 30)`` works, and a one-layer Pixtral vision tower the
pipeline never runs) whose three hidden states are stacked like [klein]'s, the same transformer and VAE but with
FLUX.2 [dev]'s guidance embedding (guidance-distilled: one call per step, no CFG). Its ``tokenizer`` component is
the Mistral tokenizer itself (``attnctl.tokenizers.build_mistral_tokenizer``: Tekken-like byte-level BPE, the
``[SYSTEM_PROMPT]``/``[INST]`` chat template below), not the ``PixtralProcessor`` the hub checkpoint ships:
transformers 5 builds ``PixtralProcessor`` only with torchvision installed, and PyPI's torchvision wheel needs
a CUDA build of torch (this project's CPU torch cannot load its operators). The pipeline only calls its
``apply_chat_template`` on text (system message and prompt), which a tokenizer with the same chat template
renders and tokenizes identically (a processor adds no special tokens to a text that starts with the begin token,
and the tokenizer's ``apply_chat_template`` never does).

``Flux2KleinKVPipeline`` takes [klein]'s components; its constructor installs the KV-cache attention processors
on the transformer, so ``flux2_klein_kv`` builds fresh ones.
"""

from __future__ import annotations

from .tokenizers import DEFAULT_WORDS, build_mistral_tokenizer, build_qwen_tokenizer

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
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tokenizer or flux2_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=27,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    ))
    transformer, vae = _transformer(guidance_embeds=False), _vae()  # [klein]: CFG is a second call
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)


def _transformer(guidance_embeds: bool):
    """The tiny FLUX.2 MM-DiT: one double-stream block, two single-stream blocks, 4 heads x 8 dims, text features
    of 48 (three stacked hidden states of a 16-wide text encoder)."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels patchified 2x2
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=48,
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance_embeds,
    )


def _vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


# The chat turns FLUX.2 [dev] wraps a prompt in: its system message, then the prompt as a user turn, Mistral's
# layout (``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]``); a message's content is a string or a list of
# text and image blocks (the pipeline passes lists), an image block the ``[IMG]`` placeholder.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' }}{%- elif m['role'] == 'user' %}{{- '[INST]' }}{%- endif %}"
    "{%- if m['content'] is string %}{{- m['content'] }}{%- else %}{%- for block in m['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}{%- elif block['type'] in ('image', 'image_url') %}"
    "{{- '[IMG]' }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if m['role'] == 'system' %}{{- '[/SYSTEM_PROMPT]' }}{%- elif m['role'] == 'user' %}{{- '[/INST]' }}"
    "{%- else %}{{- eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# The words of FLUX.2 [dev]'s system message (diffusers' ``pipelines.flux2.system_messages.SYSTEM_MESSAGE``), one
# token each so the template takes 35 tokens rather than 160 byte tokens.
DEV_SYSTEM_WORDS = tuple((
    "You are AI that reasons about image descriptions give structured responses focusing object relationships "
    "attribution actions without speculation"
).split())


def mistral_tokenizer():
    """The Mistral tokenizer of ``tiny:flux2-dev``: ``DEFAULT_WORDS`` and the system message's words, the chat
    template above, right padding."""
    return build_mistral_tokenizer(tuple(DEFAULT_WORDS) + DEV_SYSTEM_WORDS, chat_template=MISTRAL_CHAT_TEMPLATE,
                                   model_max_length=512)


def flux2_dev(tokenizer=None):
    """The stock ``Flux2Pipeline`` (FLUX.2 [dev]) with tiny random components (call under ``torch.manual_seed``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = tokenizer or mistral_tokenizer()
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=64, patch_size=16),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
    )
    text_encoder = Mistral3ForConditionalGeneration(config)
    transformer, vae = _transformer(guidance_embeds=True), _vae()  # [dev]: guidance-distilled, one call per step
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)


def flux2_klein_kv(seed: int = 0):
    """The stock ``Flux2KleinKVPipeline`` on fresh components of ``tiny_pipeline("flux2", seed)`` (the same weights,
    in eval mode); its constructor gives the transformer the KV-cache attention processors."""
    from diffusers import Flux2KleinKVPipeline

    from .testing import tiny_pipeline

    pipe = Flux2KleinKVPipeline(**tiny_pipeline("flux2", seed).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
