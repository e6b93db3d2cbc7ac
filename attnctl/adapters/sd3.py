"""SD3 / SD3.5 MM-DiT. Joint attention runs on [image; text]; SD3.5's dual blocks add image-only ``attn2``.

Each module keeps its own processor (``JointAttnProcessor2_0`` or a subclass); a control sees its
scaled-dot-product-attention call over the concatenated [image; text] sequence. Like stock diffusers, an
``attention_mask`` reaches the control only if the processor passes one to SDPA (``JointAttnProcessor2_0``
does not).
"""

from __future__ import annotations

from .. import layouts
from ..intercept import CallPlan, Tokens
from .base import Adapter, TextPass, TextSegment, n_tokens


class SD3Adapter(Adapter):
    family = "sd3"
    denoiser_attr = "transformer"
    latent_arg = "hidden_states"
    denoiser_class = "diffusers:SD3Transformer2DModel"
    block_attrs = ("transformer_blocks",)
    tail_attrs = ("norm_out",)  # norm_out(hidden_states, temb)
    late_rows_blockers = frozenset({"block_controlnet_hidden_states"})
    # SD3's IP-Adapter: first the joint attention (the one controls see), then the image-prompt attention.
    call_plans = (("diffusers.models.attention_processor:SD3IPAdapterJointAttnProcessor2_0",
                   CallPlan(0, 2, "the joint attention, then the image-prompt attention")),)

    # SD3's skip-layer guidance (``skip_guidance_layers``) adds a second call per step on the cond latents.
    layout_kinds = Adapter.layout_kinds + (layouts.SKIP_LAYERS,)

    def call_kind(self, call):
        """SD3's skip-layer-guidance call is the one the pipeline passes ``skip_layers=`` to (StableDiffusion3
        Pipeline: only that call; its main call is a plain CFG batch even while ``do_classifier_free_guidance``
        is True). Every other call is laid out as in the base adapter."""
        if call.in_pipeline and call.params.get("skip_layers") is not None:
            return layouts.SKIP_LAYERS
        return super().call_kind(call)

    def kind_of(self, module):
        return "joint" if getattr(module, "add_k_proj", None) is not None else "self"

    def tokens(self, site, inputs, frame):
        n_image = n_tokens(inputs["hidden_states"])
        text = inputs["encoder_hidden_states"]
        if site.kind != "joint" or text is None:
            return Tokens(None, slice(0, n_image), n_image, n_image)
        total = n_image + int(text.shape[1])  # JointAttnProcessor2_0 concatenates [image; text]
        return Tokens(slice(n_image, total), slice(0, n_image), total, total)

    def latent_hw(self, params):
        hidden = params["hidden_states"]
        patch = self._patch
        return int(hidden.shape[-2]) // patch, int(hidden.shape[-1]) // patch

    _patch = 1

    def denoiser(self, pipe):
        transformer = pipe.transformer
        self._patch = int(transformer.config.patch_size)
        return transformer

    text_stream = True
    text_positionless = True  # position embeddings only on the image patches

    def encode_text(self, pipe, prompts, text_len, device, dtype):
        # [CLIP-L ++ CLIP-G (77 tokens); T5 (text_len - 77 tokens)], by the pipeline's own encoders (the class's
        # method: attnctl wraps the instance's to see the call's own prompt)
        clip_len = pipe.tokenizer.model_max_length
        embeds = type(pipe).encode_prompt(pipe, prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                          num_images_per_prompt=1, do_classifier_free_guidance=False,
                                          max_sequence_length=max(text_len - clip_len, 1))[0]
        return embeds.to(device=device, dtype=dtype)

    def embed_text(self, denoiser, text):
        return denoiser.context_embedder(text)

    def text_pass(self, block, text, inputs):
        """``JointTransformerBlock``'s text side (SD3.5's dual blocks too: their ``attn2`` reads only the image
        stream) under the stock ``JointAttnProcessor2_0``: ``norm1_context`` modulated by the block's ``temb``,
        the joint module's ``add_q/k/v_proj`` and ``norm_added_q/k``; after attention its ``to_add_out``, the
        gated residual, ``norm2_context`` and ``ff_context``. The last block (``context_pre_only``) has no text
        output."""
        from diffusers.models.attention import JointTransformerBlock, _chunked_feed_forward
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        attn = getattr(block, "attn", None)
        if type(block) is not JointTransformerBlock or type(attn.processor) is not JointAttnProcessor2_0:
            return None
        temb, stream = inputs["temb"], text.tokens
        if block.context_pre_only:
            normed = block.norm1_context(stream, temb)
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(stream, emb=temb)
        batch, n_heads = stream.shape[0], attn.heads

        def heads(x):
            return x.view(batch, -1, n_heads, x.shape[-1] // n_heads).transpose(1, 2)

        q, k, v = (heads(f(normed)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            q = attn.norm_added_q(q)
        if attn.norm_added_k is not None:
            k = attn.norm_added_k(k)
        if block.context_pre_only:
            return TextPass(q, k, v, None)

        def finish(out):
            out = attn.to_add_out(out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(q.dtype))
            after = stream + gate_msa.unsqueeze(1) * out
            normed = block.norm2_context(after) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            if block._chunk_size is not None:
                ff = _chunked_feed_forward(block.ff_context, normed, block._chunk_dim, block._chunk_size)
            else:
                ff = block.ff_context(normed)
            return after + gate_mlp.unsqueeze(1) * ff

        return TextPass(q, k, v, finish)

    def text_segments(self, pipe):
        # prompt_embeds = [CLIP-L ++ CLIP-G (channel-concatenated, 77 tokens); T5 tokens]
        clip = pipe.tokenizer
        segments = [TextSegment(clip, 0, clip.model_max_length)]
        if getattr(pipe, "text_encoder_3", None) is not None and getattr(pipe, "tokenizer_3", None) is not None:
            segments.append(TextSegment(pipe.tokenizer_3, clip.model_max_length, None))
        return segments
