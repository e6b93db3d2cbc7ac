"""SD3 / SD3.5 MM-DiT. Joint attention runs on [image; text]; SD3.5's dual blocks add image-only ``attn2``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Adapter, TextSegment
from .processor import AttnctlProcessor, split_heads


class SD3Processor(AttnctlProcessor):
    """diffusers' ``JointAttnProcessor2_0`` with the control hook. Unlike it, an ``attention_mask`` is honoured
    (as an additive bias / boolean mask over the joint sequence) instead of silently dropped."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = split_heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                        attn.to_v(hidden_states), attn.norm_q, attn.norm_k)
        n_image = query.shape[2]
        text = None
        if encoder_hidden_states is not None:
            eq, ek, ev = split_heads(attn, attn.add_q_proj(encoder_hidden_states),
                                     attn.add_k_proj(encoder_hidden_states), attn.add_v_proj(encoder_hidden_states),
                                     attn.norm_added_q, attn.norm_added_k)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)
            text = slice(n_image, query.shape[2])

        call = self.session.attention_call(self.site, query, key, value, text=text, image=slice(0, n_image),
                                           bias=attention_mask)
        if call is None and attention_mask is None:
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        elif call is None:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)
        else:
            hidden_states = call.compute()
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * query.shape[-1])
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class SD3Adapter(Adapter):
    family = "sd3"
    denoiser_attr = "transformer"
    latent_arg = "hidden_states"
    processor_classes = frozenset({"JointAttnProcessor2_0"})
    denoiser_class = "diffusers:SD3Transformer2DModel"
    block_attrs = ("transformer_blocks",)
    tail_attrs = ("norm_out",)  # norm_out(hidden_states, temb)
    late_rows_blockers = frozenset({"block_controlnet_hidden_states"})
    processor = SD3Processor

    def kind_of(self, module):
        return "joint" if getattr(module, "add_k_proj", None) is not None else "self"

    def latent_hw(self, params):
        hidden = params["hidden_states"]
        patch = self._patch
        return int(hidden.shape[-2]) // patch, int(hidden.shape[-1]) // patch

    _patch = 1

    def denoiser(self, pipe):
        transformer = pipe.transformer
        self._patch = int(transformer.config.patch_size)
        return transformer

    def text_segments(self, pipe):
        # prompt_embeds = [CLIP-L ++ CLIP-G (channel-concatenated, 77 tokens); T5 tokens]
        clip = pipe.tokenizer
        segments = [TextSegment(clip, 0, clip.model_max_length)]
        if getattr(pipe, "text_encoder_3", None) is not None and getattr(pipe, "tokenizer_3", None) is not None:
            segments.append(TextSegment(pipe.tokenizer_3, clip.model_max_length, None))
        return segments
