"""FLUX. Double-stream blocks attend over [text; image]; single-stream blocks get the joined sequence."""

from __future__ import annotations

from .base import Adapter, TextSegment
from .processor import AttnctlProcessor


class FluxProcessor(AttnctlProcessor):
    """diffusers' ``FluxAttnProcessor`` with the control hook. Its ``__call__`` names every argument because
    ``FluxAttention`` passes only the keyword arguments a processor's signature names."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections
        import torch

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
        else:  # single-stream: the block joined [text; image] before calling us
            frame = self.session.frame
            n_text = frame.text_len if frame is not None and frame.text_len is not None else 0
        seq = query.shape[1]
        call = self.session.attention_call(
            self.site, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            text=slice(0, n_text) if n_text else None, image=slice(n_text, seq), bias=attention_mask,
        )
        if call is None:
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                                  backend=self._attention_backend,
                                                  parallel_config=self._parallel_config)
        else:
            hidden_states = call.compute().transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxAdapter(Adapter):
    family = "flux"
    denoiser_attr = "transformer"
    latent_arg = "hidden_states"
    unbatched_args = frozenset({"txt_ids", "img_ids"})
    timestep_scale = 1000.0  # FluxPipeline passes t / 1000
    processor_classes = frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0"})
    denoiser_class = "diffusers:FluxTransformer2DModel"
    attention_class = "diffusers.models.transformers.transformer_flux:FluxAttention"
    block_attrs = ("transformer_blocks", "single_transformer_blocks")
    tail_attrs = ("norm_out",)  # norm_out(hidden_states, temb)
    block_unbatched_args = frozenset({"image_rotary_emb"})  # (cos, sin) per token, shared by every row
    late_rows_blockers = frozenset({"controlnet_block_samples", "controlnet_single_block_samples"})
    processor = FluxProcessor

    def kind_of(self, module):
        return "joint" if module.added_kv_proj_dim is not None else "single"

    def latent_hw(self, params):
        ids = params.get("img_ids")
        if ids is None:
            return None
        ids = ids[0] if ids.ndim == 3 else ids
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def default_branch(self, session, n_rows):
        # No CFG batch: true CFG runs a separate call inside cache_context("uncond").
        return ["uncond" if session._branch_name == "uncond" else "cond"] * n_rows

    def text_segments(self, pipe):
        return [TextSegment(pipe.tokenizer_2, 0, None)]
