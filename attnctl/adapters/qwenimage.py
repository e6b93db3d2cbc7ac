"""Qwen-Image (``QwenImageTransformer2DModel``): double-stream MM-DiT blocks over [text; image].

Every block's ``attn`` is joint attention: ``QwenDoubleStreamAttnProcessor2_0`` (or a subclass the user set)
projects the text and image streams separately, applies RoPE and calls ``dispatch_attention_fn`` once on the
concatenated [text; image] sequence, (B, S, H, D), with a boolean key mask when the prompts of a batch have
different lengths. A control sees that call; a call no control acts on goes to the chosen backend unchanged.

Batch layout: ``QwenImagePipeline`` runs true CFG as two calls per step, the prompt's under
``transformer.cache_context("cond")`` and the negative prompt's under ``"uncond"`` (every Qwen-Image pipeline of
diffusers names its calls this way), so the cond call takes PAG's extra rows and the uncond call the guidance delta
the cond rows took. The pipeline rescales the true-CFG result to the cond prediction's norm
(``comb * |cond| / |comb|``); with PAG folded into both rows that rescale sees ``cond + delta``.

Image tokens: ``img_shapes[0]`` lists the (frames, height, width) token grids of the image stream; the first is the
image being generated. Qwen-Image-Edit appends the reference image's latents after it (``img_shapes`` then holds
two grids), so the image span controls see is the generated grid only: maps, regions and excite read and act on
the generated image's queries, while its reference tokens stay ordinary keys. Its text stream holds the input
image's vision tokens before the prompt, so word positions there are refused (``text_segments``), not guessed,
and so is a second text encoded without them (the ``nag`` control's negative prompt).

A second text stream (``nag``) keeps its own length, as a prompt does here (the pipeline trims a prompt batch to
its longest real text and masks the rest): its text RoPE is the transformer's for that length beside the call's
image grids, its padding a key mask.
"""

from __future__ import annotations

import inspect
from math import prod

import torch

from .. import layouts
from ..errors import ModelError
from ..intercept import Tokens
from .base import Adapter, SecondText, TextPass, TextSegment, n_tokens


class QwenImageAdapter(Adapter):
    family = "qwenimage"
    denoiser_attr = "transformer"
    latent_arg = "hidden_states"
    unbatched_args = frozenset({"img_shapes"})
    timestep_scale = 1000.0  # QwenImagePipeline passes t / 1000
    denoiser_class = "diffusers:QwenImageTransformer2DModel"
    block_attrs = ("transformer_blocks",)
    tail_attrs = ("norm_out",)  # norm_out(hidden_states, temb)
    block_unbatched_args = frozenset({"image_rotary_emb"})  # (image freqs, text freqs) per token, shared by rows
    late_rows_blockers = frozenset({"controlnet_block_samples"})
    layout_kinds = (layouts.COND_BATCH, layouts.UNCOND_CALL, layouts.OUTSIDE)
    inversion_unsupported = ("its VAE (AutoencoderKLQwenImage) normalises latents per channel (latents_mean, "
                             "latents_std), not by one scaling_factor, and attnctl cannot encode a real image into "
                             "its latent space yet; edit generated images (an edit without `image:`) instead")

    def kind_of(self, module):
        return "joint"

    def tokens(self, site, inputs, frame):
        n_image = n_tokens(inputs["hidden_states"])
        text = inputs["encoder_hidden_states"]
        n_text = int(text.shape[1]) if text is not None else 0
        total = n_text + n_image
        generated = n_image
        grids = self._grids(frame.params if frame is not None else {})
        if grids:
            generated = min(n_image, prod(grids[0]))
        return Tokens(slice(0, n_text) if n_text else None, slice(n_text, n_text + generated), total, total)

    @staticmethod
    def _grids(params: dict) -> list[tuple[int, ...]]:
        """The (frames, height, width) token grids of the first sample's image stream (``img_shapes[0]``)."""
        shapes = params.get("img_shapes")
        if not shapes:
            return []
        first = shapes[0]
        grids = first if isinstance(first, list) else [first]
        return [tuple(int(x) for x in grid) for grid in grids]

    def latent_hw(self, params):
        grids = self._grids(params)
        if not grids:
            return None
        _, height, width = grids[0]
        return height, width

    def reference_grids(self, params):
        return [(height, width) for _, height, width in self._grids(params)[1:]]

    def call_kind(self, call):
        """Qwen-Image pipelines name their calls with ``transformer.cache_context("cond" | "uncond")`` (a modular
        pipeline's guider names its own). A call
        inside a pipeline call without one is matched by its text embeddings: the first ``encode_prompt`` result
        (the prompt) is cond, the second (the negative prompt) uncond. Anything else is a ``LayoutError``."""
        return layouts.true_cfg_kind(call)

    def text_segments(self, pipe):
        """The text span holds the Qwen2.5-VL encoding of the prompt template with its system prefix dropped
        (``prompt_template_encode_start_idx`` tokens); the prompt's own tokens start where that prefix ends."""
        tokenizer = pipe.tokenizer
        template = getattr(pipe, "prompt_template_encode", None)
        if "Edit" in type(pipe).__name__ or (template and "<|image_pad|>" in template):
            raise ModelError(
                f"{type(pipe).__name__}: attnctl cannot find prompt words in Qwen-Image-Edit's text stream: its "
                "template puts the input image's vision tokens (as many as the image's size gives) before the "
                "prompt, so word-level controls (excite, regions, maps, edit) are not supported there; perturb "
                "does not need word positions")
        dropped = int(getattr(pipe, "prompt_template_encode_start_idx", 0) or 0)
        offset = 0
        if template and "{}" in template:
            prefix = template.split("{}", 1)[0]
            offset = len(tokenizer(prefix, add_special_tokens=False).input_ids) - dropped
        return [TextSegment(tokenizer, offset, None)]


    # -- a second text stream (the ``nag`` control) ---------------------------------------------------------
    text_stream = True
    text_own_length = True  # prompts keep their own length (padded to the batch's longest with a mask)

    def second_text_unsupported(self, pipe):
        if "image" in inspect.signature(type(pipe).encode_prompt).parameters:
            return (f"{type(pipe).__name__} encodes the input image into the text stream (its vision tokens before "
                    "the prompt), and attnctl encodes a second text without it")
        if getattr(self.denoiser(pipe).config, "zero_cond_t", False):
            return ("this transformer (zero_cond_t) modulates with two timestep rows per sample, which attnctl does "
                    "not split between a second text's rows")
        return ""

    def encode_text(self, pipe, prompts, text_len, device, dtype):
        """The pipeline's own template and Qwen2.5-VL encoding, at the texts' own length (the longest; the
        others' padding masked, as the pipeline masks a prompt batch's)."""
        embeds, mask = type(pipe).encode_prompt(pipe, prompt=prompts, device=device, num_images_per_prompt=1)
        return embeds.to(device=device, dtype=dtype), None if mask is None else mask.to(device=device).bool()

    def start_text(self, denoiser, text, mask, params, rows):
        """``txt_norm`` and ``txt_in`` of the text, and its rotary embedding: the text positions the transformer
        gives a text of this length beside the call's image grids (``pos_embed``)."""
        tokens = denoiser.txt_in(denoiser.txt_norm(text))
        rope = denoiser.pos_embed(params["img_shapes"], max_txt_seq_len=tokens.shape[1], device=tokens.device)[1]
        return SecondText(tokens, mask, rope)

    def with_text(self, block, inputs, text):
        rope = inputs.get("image_rotary_emb")
        return dict(inputs, encoder_hidden_states=text.tokens, encoder_hidden_states_mask=text.mask,
                    image_rotary_emb=None if rope is None else (rope[0], text.rope))

    def text_pass(self, block, text, inputs):
        """``QwenImageTransformerBlock``'s text side under the stock ``QwenDoubleStreamAttnProcessor2_0``:
        ``txt_norm1`` modulated by ``txt_mod`` of the block's ``temb``, the module's ``add_q/k/v_proj`` and
        ``norm_added_q/k``, the text's rotary embedding; after attention ``to_add_out``, the gated residual,
        ``txt_norm2`` modulated and ``txt_mlp``. The attention mask is the processor's: the text's padding
        masked as keys, the image tokens all kept."""
        from diffusers.models.transformers.transformer_qwenimage import (QwenDoubleStreamAttnProcessor2_0,
                                                                         QwenImageTransformerBlock,
                                                                         apply_rotary_emb_qwen)

        attn = getattr(block, "attn", None)
        if (type(block) is not QwenImageTransformerBlock or type(attn.processor) is not
                QwenDoubleStreamAttnProcessor2_0 or block.zero_cond_t or getattr(attn, "fused_projections", False)):
            return None
        stream = text.tokens
        mod1, mod2 = block.txt_mod(inputs["temb"]).chunk(2, dim=-1)
        normed, gate1 = block._modulate(block.txt_norm1(stream), mod1)
        head_dim = attn.inner_dim // attn.heads
        q, k, v = (f(normed).unflatten(-1, (-1, head_dim)) for f in (attn.add_q_proj, attn.add_k_proj,
                                                                     attn.add_v_proj))
        if attn.norm_added_q is not None:
            q = attn.norm_added_q(q)
        if attn.norm_added_k is not None:
            k = attn.norm_added_k(k)
        if inputs.get("image_rotary_emb") is not None:
            q, k = (apply_rotary_emb_qwen(x, text.rope, use_real=False) for x in (q, k))
        mask = None
        if text.mask is not None:  # [text; image] keys, as the processor builds it from encoder_hidden_states_mask
            image = torch.ones(text.mask.shape[0], inputs["hidden_states"].shape[1], dtype=torch.bool,
                               device=text.mask.device)
            mask = torch.cat([text.mask, image], dim=1)[:, None, None, :]

        def finish(out):
            out = attn.to_add_out(out.transpose(1, 2).flatten(2, 3).to(q.dtype).contiguous())
            after = stream + gate1 * out
            mlp_in, gate2 = block._modulate(block.txt_norm2(after), mod2)
            after = after + gate2 * block.txt_mlp(mlp_in)
            if after.dtype == torch.float16:
                after = after.clip(-65504, 65504)
            return after

        return TextPass(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), finish, mask)
