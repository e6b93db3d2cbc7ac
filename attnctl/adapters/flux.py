"""FLUX. Double-stream blocks attend over [text; image]; single-stream blocks get the joined sequence.

Each module keeps its own processor (``FluxAttnProcessor``, FLUX's IP-Adapter one, a user's) and the attention
backend chosen for it (``set_attention_backend``); a control sees its ``dispatch_attention_fn`` call, whose
tensors are (B, S, H, D). A call no control acts on goes to that backend unchanged.
"""

from __future__ import annotations

import torch

from .. import layouts
from ..intercept import CallPlan, Tokens
from .base import Adapter, TextPass, TextSegment, import_path, n_tokens


class FluxAdapter(Adapter):
    family = "flux"
    denoiser_attr = "transformer"
    latent_arg = "hidden_states"
    unbatched_args = frozenset({"txt_ids", "img_ids"})
    timestep_scale = 1000.0  # FluxPipeline passes t / 1000
    denoiser_class = "diffusers:FluxTransformer2DModel"
    attention_class = "diffusers.models.transformers.transformer_flux:FluxAttention"
    block_attrs = ("transformer_blocks", "single_transformer_blocks")
    tail_attrs = ("norm_out",)  # norm_out(hidden_states, temb)
    block_unbatched_args = frozenset({"image_rotary_emb"})  # (cos, sin) per token, shared by every row
    late_rows_blockers = frozenset({"controlnet_block_samples", "controlnet_single_block_samples"})
    # FLUX's IP-Adapter: first the joint attention (the one controls see), then one call per image prompt.
    call_plans = (("diffusers.models.transformers.transformer_flux:FluxIPAdapterAttnProcessor",
                   CallPlan(0, None, "the joint attention, then one call per image prompt")),)

    def kind_of(self, module):
        return "joint" if module.added_kv_proj_dim is not None else "single"

    def tokens(self, site, inputs, frame):
        n = n_tokens(inputs["hidden_states"])
        text = inputs["encoder_hidden_states"]
        if text is not None:  # double-stream: the processor concatenates [text; image]
            n_text, total = int(text.shape[1]), n + int(text.shape[1])
        else:  # single-stream: the block joined [text; image] before calling the module
            n_text = frame.text_len if frame is not None and frame.text_len is not None else 0
            total = n
        return Tokens(slice(0, n_text) if n_text else None, slice(n_text, total), total, total)

    def latent_hw(self, params):
        ids = params.get("img_ids")
        if ids is None:
            return None
        ids = ids[0] if ids.ndim == 3 else ids
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    # FLUX is guidance-distilled: no CFG batch. True CFG (a negative prompt and true_cfg_scale > 1) runs the
    # negative prompt as a separate call at the same step, after the cond call.
    layout_kinds = (layouts.COND_BATCH, layouts.UNCOND_CALL, layouts.OUTSIDE)

    def call_kind(self, call):
        """FluxPipeline names its calls with ``transformer.cache_context("cond" | "uncond")``; FLUX pipelines
        without it (img2img, inpaint, Kontext, ControlNet) pass the negative prompt's embeddings, which came
        from their second ``encode_prompt`` call (``text_source`` 1), to the uncond call. A call that is neither
        is a ``LayoutError``."""
        return layouts.true_cfg_kind(call)

    text_stream = True
    # The block classes ``text_pass`` splits (Chroma's blocks are FLUX's with pruned modulation).
    double_block_class = "diffusers.models.transformers.transformer_flux:FluxTransformerBlock"
    single_block_class = "diffusers.models.transformers.transformer_flux:FluxSingleTransformerBlock"

    def encode_text(self, pipe, prompts, text_len, device, dtype):
        # T5 embeddings padded to the call's own length (the RoPE ids cover text_len text tokens); the class's
        # method: attnctl wraps the instance's to see the call's own prompt
        embeds = type(pipe).encode_prompt(pipe, prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                          max_sequence_length=text_len)[0]
        return embeds.to(device=device, dtype=dtype)

    def embed_text(self, denoiser, text):
        return denoiser.context_embedder(text)

    def start_text(self, denoiser, text, mask, params, rows):
        # single-stream blocks that take [text; image] joined (FLUX.2, Chroma) hold the call's text first
        stream = super().start_text(denoiser, text, mask, params, rows)
        stream.joined = slice(0, int(params[self.text_arg].shape[1]))
        return stream

    def text_blocks(self, denoiser):
        return [(name, module) for name, module in self.blocks(denoiser) if name.split(".")[0] in self.block_attrs]

    def with_text(self, block, inputs, text):
        """Double-stream blocks take the text as ``encoder_hidden_states``; a single-stream block that takes
        [text; image] joined (``encoder_hidden_states`` absent or None) gets [``text``; the call's image
        tokens]. A text padding mask (Chroma's ``attention_mask`` over [text; image]) takes the second text's."""
        inputs = dict(inputs)
        if inputs.get("encoder_hidden_states") is not None:
            inputs["encoder_hidden_states"] = text.tokens
        else:
            joined = inputs["hidden_states"]
            inputs["hidden_states"] = torch.cat([text.tokens.to(joined.dtype), joined[:, text.joined.stop:]], dim=1)
        if inputs.get("attention_mask") is not None:
            inputs["attention_mask"] = self._text_mask(inputs["attention_mask"], text)
        return inputs

    def text_after(self, block, out, text):
        return out[0] if isinstance(out, tuple) else out[:, : text.tokens.shape[1]]

    @staticmethod
    def _text_mask(mask, text):
        """A (B, T + S_image) padding mask of the call's [text; image] tokens with the second text's real tokens
        (all of them where it has no mask) in place of the call's text's."""
        own = torch.ones(text.tokens.shape[:2], device=mask.device) if text.mask is None else text.mask
        return torch.cat([own.to(mask.dtype), mask[:, text.joined.stop:]], dim=1)

    def _context_emb(self, block, temb):
        """The part of a double-stream block's ``temb`` its text-stream norm takes."""
        return temb

    def text_pass(self, block, text, inputs):
        """The text side of a double-stream block (``norm1_context`` by the block's ``temb``, the module's
        ``add_q/k/v_proj`` and ``norm_added_q/k``; after attention ``to_add_out``, the gated residual,
        ``norm2_context`` and ``ff_context``) or of a single-stream block (its ``norm``, the module's shared
        ``to_q/k/v`` and ``norm_q/k`` on the text tokens; after attention ``proj_mlp`` and ``proj_out`` on those
        tokens only: every step but attention is per token), with the text positions' rotary embedding
        (the first S_text of the call's ``image_rotary_emb``, [text; image]) and, where the block takes one
        (Chroma), the block's attention mask over [``text``; image]. Under the stock ``FluxAttnProcessor`` with
        unfused projections only."""
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        double_class, single_class = import_path(self.double_block_class), import_path(self.single_block_class)
        attn = getattr(block, "attn", None)
        if (type(block) not in (double_class, single_class)
                or type(attn.processor) is not FluxAttnProcessor or getattr(attn, "fused_projections", False)):
            return None
        double = type(block) is double_class
        temb, rope, stream = inputs["temb"], inputs.get("image_rotary_emb"), text.tokens
        n_text = stream.shape[1]
        if double:
            normed, gate, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(stream,
                                                                               emb=self._context_emb(block, temb))
            projections, norms = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q,
                                                                                        attn.norm_added_k)
        else:
            normed, gate = block.norm(stream, emb=temb)
            projections, norms = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
        q, k, v = (f(normed).unflatten(-1, (-1, attn.head_dim)) for f in projections)
        q, k = norms[0](q), norms[1](k)
        if rope is not None:
            rope = tuple(r[:n_text] for r in rope)
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
        mask = inputs.get("attention_mask")
        if mask is not None:  # as the block expands it: (B, 1, S, S), the product of the mask with itself
            mask = self._text_mask(mask, text)
            mask = mask[:, None, None, :] * mask[:, None, :, None]

        def finish(out):
            out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
            if double:
                after = stream + gate.unsqueeze(1) * attn.to_add_out(out.contiguous())
                mlp_in = block.norm2_context(after) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                after = after + gate_mlp.unsqueeze(1) * block.ff_context(mlp_in)
            else:
                mlp = block.act_mlp(block.proj_mlp(normed))
                after = stream + gate.unsqueeze(1) * block.proj_out(torch.cat([out, mlp], dim=2))
            if after.dtype == torch.float16:
                after = after.clip(-65504, 65504)
            return after

        return TextPass(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), finish, mask)

    def text_segments(self, pipe):
        return [TextSegment(pipe.tokenizer_2, 0, None)]
