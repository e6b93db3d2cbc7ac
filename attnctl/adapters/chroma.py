"""Chroma: FLUX's MM-DiT without CLIP or guidance embedding, T5 only, real CFG and an attention mask.

Its blocks use FLUX's ``FluxAttention`` with ``FluxAttnProcessor`` (double-stream [text; image], single-stream
on the joined sequence), so token placement is FLUX's. Differences declared here: ``ChromaPipeline`` builds a 1/0
padding mask (all but one T5 pad token) in the prompt's float dtype, which the blocks expand to (B, 1, S, S) and
pass to the attention call; SDPA adds a float mask to the scores, so in diffusers 0.42.1 it raises kept pairs
by 1 rather than masking padding. attnctl passes it on unchanged and adds a control's bias to it. The ``nag``
control's negative text (encoded by ``encode_prompt`` at the call's text length) gets its own mask, built and
expanded the same way, in the blocks and in its attention over the call's image tokens.
CFG is a second transformer call per step on the negative prompt's embeddings, made without a cache context;
both embeddings come from one ``encode_prompt`` call, so a pipeline call's cond call is the one whose text is
that call's first result and, while ``do_classifier_free_guidance`` holds, any other is the uncond call.
"""

from __future__ import annotations

from .. import layouts
from ..errors import LayoutError
from .base import TextSegment
from .flux import FluxAdapter


class ChromaAdapter(FluxAdapter):
    family = "chroma"
    denoiser_class = "diffusers:ChromaTransformer2DModel"
    late_rows_blockers = frozenset({"controlnet_block_samples", "controlnet_single_block_samples"})
    call_plans = ()
    layout_kinds = (layouts.COND_BATCH, layouts.UNCOND_CALL, layouts.OUTSIDE)
    double_block_class = "diffusers.models.transformers.transformer_chroma:ChromaTransformerBlock"
    single_block_class = "diffusers.models.transformers.transformer_chroma:ChromaSingleTransformerBlock"

    def call_kind(self, call):
        if not call.in_pipeline:
            return layouts.OUTSIDE
        if call.text_source == 0:
            return layouts.COND_BATCH
        if call.cfg:
            return layouts.UNCOND_CALL
        raise LayoutError(f"{call.describe()}: its encoder_hidden_states are not the prompt's embeddings from this "
                          "pipeline call's encode_prompt and the pipeline runs no CFG; expected the cond call")

    def text_segments(self, pipe):
        return [TextSegment(pipe.tokenizer, 0, None)]

    def encode_text(self, pipe, prompts, text_len, device, dtype):
        """T5 at the call's text length, with ChromaPipeline's padding mask (its real tokens and the first pad
        token): the blocks then give the second text the attention mask the pipeline gives a prompt."""
        embeds, _, mask = type(pipe).encode_prompt(pipe, prompt=prompts, device=device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False,
                                                   max_sequence_length=text_len)[:3]
        return embeds.to(device=device, dtype=dtype), mask.to(device=device).bool()

    def _context_emb(self, block, temb):
        return temb[:, 6:]  # ChromaTransformerBlock: [image modulation (6); text modulation (6)]


__all__ = ["ChromaAdapter"]
