"""UNet families: SD1.x/2.x and SDXL. ``attn1`` is self-attention, ``attn2`` cross-attention to the text."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Adapter, TextSegment
from .processor import AttnctlProcessor, split_heads


class UNetProcessor(AttnctlProcessor):
    """diffusers' ``AttnProcessor2_0`` with the control hook between projections and output."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = split_heads(attn, query, attn.to_k(encoder_hidden_states),
                                        attn.to_v(encoder_hidden_states), attn.norm_q, attn.norm_k)

        call = self.session.attention_call(
            self.site, query, key, value, text=slice(0, key.shape[2]) if is_cross else None,
            image=slice(0, query.shape[2]), bias=attention_mask,
        )
        if call is None:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)
        else:
            hidden_states = call.compute()

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * query.shape[-1])
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class UNetAdapter(Adapter):
    family = "sd15"
    denoiser_attr = "unet"
    latent_arg = "sample"
    processor_classes = frozenset({"AttnProcessor2_0", "AttnProcessor"})
    denoiser_class = "diffusers:UNet2DConditionModel"
    processor = UNetProcessor
    block_attrs = ("down_blocks", "mid_block", "up_blocks")
    late_rows_blockers = frozenset({"down_block_additional_residuals", "mid_block_additional_residual",
                                    "down_intrablock_additional_residuals"})  # ControlNet / T2I-Adapter

    def kind_of(self, module):
        return "cross" if module.is_cross_attention else "self"

    def latent_hw(self, params):
        sample = params["sample"]
        return int(sample.shape[-2]), int(sample.shape[-1])

    def text_segments(self, pipe):
        tokenizer = pipe.tokenizer
        return [TextSegment(tokenizer, 0, tokenizer.model_max_length)]


class SDXLAdapter(UNetAdapter):
    """SDXL: the UNet adapter; two CLIP encoders concatenated per token, so token positions are shared."""

    family = "sdxl"

    @classmethod
    def matches(cls, pipe) -> bool:
        return super().matches(pipe) and getattr(pipe, "text_encoder_2", None) is not None and hasattr(
            pipe, "tokenizer_2")

    def text_segments(self, pipe):
        tokenizer = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
        return [TextSegment(tokenizer, 0, tokenizer.model_max_length)]


__all__ = ["SDXLAdapter", "UNetAdapter", "UNetProcessor", "torch"]
