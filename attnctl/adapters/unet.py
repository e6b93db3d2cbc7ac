"""UNet families: SD1.x/2.x and SDXL. ``attn1`` is self-attention, ``attn2`` cross-attention to the text.

Each module keeps its own processor (``AttnProcessor2_0``, IP-Adapter's, a user's); a control sees its
scaled-dot-product-attention call: attn1 over the image tokens only, attn2 from the image tokens to the text.
"""

from __future__ import annotations

from ..intercept import CallPlan, Tokens
from .base import Adapter, TextSegment, n_tokens


class UNetAdapter(Adapter):
    family = "sd15"
    denoiser_attr = "unet"
    latent_arg = "sample"
    denoiser_class = "diffusers:UNet2DConditionModel"
    # IP-Adapter: first the text cross-attention (the one controls see), then one call per image prompt.
    call_plans = (("diffusers.models.attention_processor:IPAdapterAttnProcessor2_0",
                   CallPlan(0, None, "the text cross-attention, then one call per image prompt")),)
    block_attrs = ("down_blocks", "mid_block", "up_blocks")
    late_rows_blockers = frozenset({"down_block_additional_residuals", "mid_block_additional_residual",
                                    "down_intrablock_additional_residuals"})  # ControlNet / T2I-Adapter

    def kind_of(self, module):
        return "cross" if module.is_cross_attention else "self"

    def tokens(self, site, inputs, frame):
        n_image = n_tokens(inputs["hidden_states"])
        if site.kind != "cross":
            return Tokens(None, slice(0, n_image), n_image, n_image)
        text = inputs["encoder_hidden_states"]
        if isinstance(text, tuple):  # IP-Adapter: (text embeddings, [image-prompt embeddings])
            text = text[0]
        n_text = int(text.shape[1])
        return Tokens(slice(0, n_text), slice(0, n_image), n_image, n_text)

    def latent_hw(self, params):
        sample = params["sample"]
        return int(sample.shape[-2]), int(sample.shape[-1])

    def text_segments(self, pipe):
        tokenizer = pipe.tokenizer
        return [TextSegment(tokenizer, 0, tokenizer.model_max_length)]

    def encode_text(self, pipe, prompts, text_len, device, dtype):
        # The class's method, not the instance attribute: attnctl wraps the latter to see the call's own prompt.
        embeds = type(pipe).encode_prompt(pipe, prompts, device, 1, False)[0]
        return embeds.to(device=device, dtype=dtype)

    def project_text(self, module, text):
        """``AttnProcessor2_0``'s key/value path: ``norm_cross``, ``to_k``/``to_v``, split heads, ``norm_k``."""
        if module.norm_cross is not None:
            text = module.norm_encoder_hidden_states(text)
        key, value = module.to_k(text), module.to_v(text)
        heads = module.heads
        key, value = (x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (key, value))
        if getattr(module, "norm_k", None) is not None:
            key = module.norm_k(key)
        return key, value


class SDXLAdapter(UNetAdapter):
    """SDXL: the UNet adapter; two CLIP encoders concatenated per token, so token positions are shared."""

    family = "sdxl"

    @classmethod
    def matches(cls, pipe) -> bool:
        return super().matches(pipe) and getattr(pipe, "text_encoder_2", None) is not None and hasattr(
            pipe, "tokenizer_2")

    @classmethod
    def matches_index(cls, index):
        second = index.get("text_encoder_2")
        return super().matches_index(index) and isinstance(second, list) and second[0] is not None and (
            "tokenizer_2" in index)

    def text_segments(self, pipe):
        tokenizer = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
        return [TextSegment(tokenizer, 0, tokenizer.model_max_length)]

    def encode_text(self, pipe, prompts, text_len, device, dtype):
        # both CLIP encoders, concatenated per token (the class's method: see UNetAdapter.encode_text)
        embeds = type(pipe).encode_prompt(pipe, prompt=prompts, device=device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)[0]
        return embeds.to(device=device, dtype=dtype)


__all__ = ["SDXLAdapter", "UNetAdapter"]
