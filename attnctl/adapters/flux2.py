"""FLUX.2 ([dev] with ``Flux2Pipeline``, [klein] with ``Flux2KleinPipeline``): one MM-DiT, two attention classes.

Double-stream blocks (``Flux2Attention``, kind ``joint``) attend over [text; image; reference images], the
processor concatenating the text stream in front; single-stream blocks (``Flux2ParallelSelfAttention``, kind
``single``, QKV fused with the MLP input) get that sequence already joined. Reference images (FLUX.2's
multi-reference editing: ``pipe(image=[...])``) are packed after the generated image's tokens in the same
stream; their position ids carry a time coordinate of 10, 20, ... where the generated image's is 0. So in every
controlled call the text span is the first ``T`` keys, the image span the next ``h * w`` queries (the generated
image only: maps, regions and Attend-and-Excite act on it) and the reference tokens follow, untouched by
controls that act on the image span. A perturbation in ``mode="full"`` replaces the whole map by the identity;
in ``mode="image"`` every non-text token (generated and reference) attends only to itself and the text.

Each module keeps its own processor and attention backend; a control sees its ``dispatch_attention_fn`` call.
``Flux2KleinKVPipeline`` installs KV-cache processors that, without reference images, make the standard
attention call (every control works); with reference images they attend twice (extract, first step) or to cached
reference keys the call does not carry (cached, later steps): ``unsupported_call`` refuses such a call under
controls, naming the pipeline, before its denoiser runs.

Words: the prompt's tokens sit inside each pipeline's chat template ([klein]: Qwen3's user turn; [dev]: Mistral's
system message and user turn); ``text_segments`` finds where by tokenizing the rendered template.

A second text stream (the ``nag`` control's negative prompt) is encoded by the pipeline's own ``encode_prompt``
at the call's text length and runs beside the prompt's: as ``encoder_hidden_states`` of the double-stream
blocks, in front of the image and reference tokens in the joined input of the single-stream blocks.

Calls: ``Flux2Pipeline`` is guidance-distilled (one cond call per step); ``Flux2KleinPipeline`` runs CFG as a
second call inside ``transformer.cache_context("uncond")`` when ``guidance_scale > 1`` and not distilled, the
layout FLUX's true CFG has, so the call kinds are FLUX's.

Inversion of a real image (``attnctl.inversion``): the pipeline's ``latents=`` is the VAE's latents patchified 2x2 and
normalised by the VAE's batch-norm statistics, (B, 4C, h/2, w/2), which the pipeline packs into tokens; the adapter
declares that encoding, its inverse (the pipeline's decode path) and the packing. [klein] has no ``negative_prompt``
argument, so the negative-prompt fix passes ``negative_prompt_embeds``; [dev] is guidance-distilled (no CFG).
"""

from __future__ import annotations

import inspect

import torch

from ..errors import ModelError
from ..intercept import Tokens
from .base import Site, TextPass, TextSegment, import_path, n_tokens
from .flux import FluxAdapter

_PROMPT_MARK = "\u2063attnctl-prompt\u2063"  # rendered into the chat template to find where the prompt starts


class Flux2Adapter(FluxAdapter):
    family = "flux2"
    unbatched_args = frozenset({"txt_ids", "img_ids", "kv_cache"})
    denoiser_class = "diffusers:Flux2Transformer2DModel"
    attention_class = "diffusers.models.transformers.transformer_flux2:Flux2Attention"
    single_class = "diffusers.models.transformers.transformer_flux2:Flux2ParallelSelfAttention"
    late_rows_blockers = frozenset()
    call_plans = ()

    def module_class(self):
        return (import_path(self.attention_class), import_path(self.single_class))

    def kind_of(self, module):
        return "joint" if getattr(module, "added_kv_proj_dim", None) is not None else "single"

    def sites(self, denoiser):
        # Flux2ParallelSelfAttention has no ``to_q`` (QKV and MLP-in are one projection): read ``head_dim``.
        cls, found = self.module_class(), []
        for name, module in denoiser.named_modules():
            if isinstance(module, cls):
                found.append((Site(name, self.kind_of(module), module.heads, module.head_dim, len(found)), module))
        return found

    def tokens(self, site, inputs, frame):
        hidden = n_tokens(inputs["hidden_states"])
        text = inputs["encoder_hidden_states"]
        if text is not None:  # double-stream: the processor concatenates [text; image; references]
            n_text = int(text.shape[1])
            total = n_text + hidden
        else:  # single-stream: the transformer joined them before the first single block
            n_text = frame.text_len if frame is not None and frame.text_len is not None else 0
            total = hidden
        n_image = total - n_text
        if frame is not None and frame.latent_hw is not None:
            n_image = min(n_image, frame.latent_hw[0] * frame.latent_hw[1])  # references follow the image
        return Tokens(slice(0, n_text) if n_text else None, slice(n_text, n_text + n_image), total, total)

    def latent_hw(self, params):
        """(h, w) of the generated image's tokens: the position ids with time coordinate 0 (references have
        10, 20, ...)."""
        ids = params.get("img_ids")
        if ids is None:
            return None
        ids = ids[0] if ids.ndim == 3 else ids
        own = ids[ids[:, 0] == 0]
        if own.shape[0] == 0:
            return None
        return int(own[:, 1].max()) + 1, int(own[:, 2].max()) + 1

    @staticmethod
    def reference_tokens(params) -> int:
        """How many reference-image tokens a denoiser call with ``params`` carries (0 without references)."""
        ids = params.get("img_ids")
        if ids is None:
            return 0
        ids = ids[0] if ids.ndim == 3 else ids
        return int((ids[:, 0] != 0).sum())

    def reference_grids(self, params):
        """(h, w) of each reference image's tokens, in order (time coordinates 10, 20, ...)."""
        ids = params.get("img_ids")
        if ids is None:
            return []
        ids = ids[0] if ids.ndim == 3 else ids
        grids = []
        for t in sorted({int(t) for t in ids[:, 0].tolist()} - {0}):
            own = ids[ids[:, 0] == t]
            grids.append((int(own[:, 1].max()) + 1, int(own[:, 2].max()) + 1))
        return grids

    def unsupported_call(self, pipe, params):
        """``Flux2KleinKVPipeline`` with reference images: its first step (``kv_cache_mode="extract"``) packs the
        references *before* the generated image and its KV processors attend twice (text and image queries to
        every key, then the references to themselves); later steps (``"cached"``) attend the text and image
        queries to reference keys and values cached from the first step, which the call's tokens do not carry.
        Neither is a call whose tokens attnctl can place, nor are the latents a control would update the
        generated image's alone. Without reference images it runs the standard attention: controls work."""
        mode = params.get("kv_cache_mode")
        if mode is None:
            return None
        return (f"{type(pipe).__name__} with reference images (image=...) cannot run under attnctl's controls: "
                f"its KV-cache attention (transformer call with kv_cache_mode={mode!r}) attends the references in a "
                "second attention call at the first step and to reference keys cached from it at later steps, "
                "tokens attnctl cannot place. Run this pipeline without reference images (text-to-image: every "
                "control works), or pass the references to Flux2KleinPipeline built from the same components "
                "(Flux2KleinPipeline(**pipe.components)), which recomputes them at every step")

    def encode_text(self, pipe, prompts, text_len, device, dtype):
        # the pipeline's own chat template and text encoder layers, padded to the call's length like its prompt
        embeds = type(pipe).encode_prompt(pipe, prompt=prompts, device=device, num_images_per_prompt=1,
                                          max_sequence_length=text_len)[0]
        return embeds.to(device=device, dtype=dtype)

    def text_pass(self, block, text, inputs):
        """The text side of a double-stream block (``norm1_context`` modulated by the block's
        ``temb_mod_txt``, the module's ``add_q/k/v_proj`` and ``norm_added_q/k``; after attention
        ``to_add_out``, the gated residual, ``norm2_context`` and ``ff_context``) or of a single-stream block
        (its ``norm`` modulated by ``temb_mod``, the module's fused ``to_qkv_mlp_proj`` and ``norm_q/k`` on the
        text tokens; after attention its SwiGLU MLP half and ``to_out`` on those tokens only), with the text
        positions' rotary embedding (the first S_text of the call's ``image_rotary_emb``: [text; image;
        references]). Under the stock ``Flux2AttnProcessor`` / ``Flux2ParallelSelfAttnProcessor`` with
        unfused double-stream projections only (the KV-cache processors are not split)."""
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux2 import (Flux2AttnProcessor, Flux2Modulation,
                                                                     Flux2ParallelSelfAttnProcessor,
                                                                     Flux2SingleTransformerBlock,
                                                                     Flux2TransformerBlock)

        attn = getattr(block, "attn", None)
        double = type(block) is Flux2TransformerBlock
        if double:
            if type(attn.processor) is not Flux2AttnProcessor or getattr(attn, "fused_projections", False):
                return None
        elif type(block) is not Flux2SingleTransformerBlock or type(attn.processor) is not \
                Flux2ParallelSelfAttnProcessor:
            return None
        rope, stream = inputs.get("image_rotary_emb"), text.tokens
        if double:
            (shift, scale, gate), (shift_mlp, scale_mlp, gate_mlp) = Flux2Modulation.split(inputs["temb_mod_txt"], 2)
            normed = (1 + scale) * block.norm1_context(stream) + shift
            q, k, v = (f(normed) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            norms = attn.norm_added_q, attn.norm_added_k
        else:
            shift, scale, gate = Flux2Modulation.split(inputs["temb_mod"], 1)[0]
            normed = (1 + scale) * block.norm(stream) + shift
            fused = attn.to_qkv_mlp_proj(normed)
            qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
            local_qkv = fused.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
            qkv, mlp = torch.split(fused, [local_qkv, fused.shape[-1] - local_qkv], dim=-1)
            q, k, v = qkv.chunk(3, dim=-1)
            norms = attn.norm_q, attn.norm_k
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = norms[0](q), norms[1](k)
        if rope is not None:
            rope = tuple(r[: stream.shape[1]] for r in rope)
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)

        def finish(out):
            out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
            if double:
                after = stream + gate * attn.to_add_out(out)
                mlp_in = block.norm2_context(after) * (1 + scale_mlp) + shift_mlp
                after = after + gate_mlp * block.ff_context(mlp_in)
            else:
                after = stream + gate * attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))
            if after.dtype == torch.float16:
                after = after.clip(-65504, 65504)
            return after

        return TextPass(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), finish)

    # -- real images ---------------------------------------------------------------------------------------------
    # Before ``vae.decode`` the pipeline scatters its tokens back to a (B, 4C, h/2, w/2) grid, undoes the VAE's
    # batch-norm normalisation (``bn.running_mean``, ``sqrt(bn.running_var + batch_norm_eps)``, one value per
    # patchified channel) and unpatchifies 2x2; its ``latents=`` argument is that normalised, patchified grid,
    # which ``prepare_latents`` packs into (B, h/2 * w/2, 4C) tokens. Encoding is the pipeline's own
    # ``_encode_vae_image``: patchify, then normalise.
    def _bn_stats(self, pipe, like):
        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def normalize_latents(self, pipe, latents):
        latents = pipe._patchify_latents(latents)
        mean, std = self._bn_stats(pipe, latents)
        return (latents - mean) / std

    def denormalize_latents(self, pipe, latents, height, width):
        mean, std = self._bn_stats(pipe, latents)
        return pipe._unpatchify_latents(latents * std + mean)

    def pack_latents(self, pipe, latents):
        return pipe._pack_latents(latents)

    def unpack_latents(self, pipe, packed, like):
        b, c, h, w = like.shape
        return packed.permute(0, 2, 1).reshape(packed.shape[0], c, h, w)

    def inversion_guidance(self, pipe, guidance_scale):
        """FLUX.2 [dev] embeds the guidance scale (no CFG); [klein] runs CFG as a second call when the scale is
        above 1 and has no guidance embedding."""
        return guidance_scale if pipe.transformer.config.guidance_embeds else 1.0

    def negative_prompt_args(self, pipe, negatives, call_kwargs):
        """[dev] runs no CFG (None). [klein] takes no ``negative_prompt`` (its CFG call encodes ""), only
        ``negative_prompt_embeds``: the negatives encoded by the pipeline's own ``encode_prompt`` with the call's
        ``max_sequence_length`` and ``text_encoder_out_layers`` (the class's method: attnctl wraps the instance's
        to see a call's own prompts)."""
        if pipe.transformer.config.guidance_embeds:
            return None
        if "negative_prompt" in inspect.signature(type(pipe).__call__).parameters:
            return super().negative_prompt_args(pipe, negatives, call_kwargs)
        options = {k: call_kwargs[k] for k in ("max_sequence_length", "text_encoder_out_layers") if k in call_kwargs}
        with torch.no_grad():
            embeds = type(pipe).encode_prompt(pipe, prompt=list(negatives), device=pipe._execution_device, **options)[0]
        return {"negative_prompt_embeds": embeds}

    def text_segments(self, pipe):
        """The prompt's tokens start after the chat turns the pipeline renders around it: [klein]'s Qwen3 user turn
        (``<|im_start|>user\n``), [dev]'s Mistral system message and user turn (``<s>[SYSTEM_PROMPT]...
        [/SYSTEM_PROMPT][INST]``). The template is rendered with a marker for the prompt and the text before the
        marker tokenized as the pipeline tokenizes the whole (checked on a probe prompt), so the offset is whatever
        the tokenizer's template and system message make it."""
        source = pipe.tokenizer  # [klein]: the Qwen tokenizer; [dev]: a PixtralProcessor (or its tokenizer)
        tokenizer = getattr(source, "tokenizer", source)  # a processor's text tokenizer
        if not hasattr(source, "apply_chat_template") or not hasattr(tokenizer, "convert_ids_to_tokens") \
                or getattr(source, "chat_template", None) is None:
            raise ModelError(
                f"{type(pipe).__name__}: attnctl finds prompt words only through a tokenizer or processor with a "
                f"chat template (FLUX.2 [klein]'s Qwen tokenizer, FLUX.2 [dev]'s Mistral processor); this "
                f"pipeline's {type(source).__name__} has none, so word-level controls (excite, regions, maps, "
                "edit) are not supported; perturb and interpolate do not need word positions"
            )
        if getattr(tokenizer, "padding_side", "right") == "left":
            raise ModelError(
                f"{type(pipe).__name__}: its {type(tokenizer).__name__} pads on the left, so where the prompt's "
                "tokens start depends on each prompt's length; attnctl places words (excite, regions, maps, edit) "
                "only with right padding (pipe.tokenizer" + (".tokenizer" if tokenizer is not source else "") +
                ".padding_side = 'right', which also changes the padding the text encoder sees)"
            )
        offset = self._prompt_start(pipe, source, tokenizer, _PROMPT_MARK)
        # Check on a probe prompt: its own tokens sit at ``offset`` in the whole template's tokens.
        probe = "a photo of a cat"
        whole = self._template_ids(pipe, source, tokenizer, probe)
        own = list(tokenizer(probe, add_special_tokens=False).input_ids)
        if whole[offset : offset + len(own)] != own:
            raise ModelError(
                f"{type(pipe).__name__}: cannot place the prompt's tokens in its chat template (the tokens before "
                f"the prompt are {offset}, but the template's tokens of the probe prompt {probe!r} there are "
                f"{tokenizer.convert_ids_to_tokens(whole[offset : offset + len(own)])}, not "
                f"{tokenizer.convert_ids_to_tokens(own)}); word-level controls are not supported on this tokenizer"
            )
        # ``attnctl.tokens.find_phrase`` counts positions in the prompt tokenized with its special tokens (a begin
        # token first for Mistral's tokenizer): the segment starts that many tokens earlier.
        return [TextSegment(tokenizer, offset - _leading_specials(tokenizer), None)]

    @staticmethod
    def _render(pipe, source, prompt: str) -> tuple[str, bool]:
        """The text the pipeline's chat template makes of ``prompt``, and whether the pipeline's tokenization of it
        adds the tokenizer's special tokens."""
        system = getattr(pipe, "system_message", None)
        if system is None:  # [klein]: one user turn, then the assistant's empty thinking; tokenizer(text)
            return source.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False), True
        # [dev]: the system message, then the user turn, as the pipeline formats them; a tokenizer's
        # apply_chat_template never adds special tokens, a processor's does unless the text starts with its begin
        # token (transformers' ProcessorMixin.apply_chat_template)
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        text = source.apply_chat_template(format_input([prompt], system_message=system)[0], tokenize=False,
                                          add_generation_prompt=False)
        tokenizer = getattr(source, "tokenizer", None)
        if tokenizer is None:
            return text, False
        bos = getattr(tokenizer, "bos_token", None)
        return text, not (bos is not None and text.startswith(bos))

    def _template_ids(self, pipe, source, tokenizer, prompt: str) -> list[int]:
        text, special = self._render(pipe, source, prompt)
        return list(tokenizer(text, add_special_tokens=special).input_ids)

    def _prompt_start(self, pipe, source, tokenizer, mark: str) -> int:
        """How many tokens precede the prompt in the pipeline's tokenization of its chat template."""
        text, special = self._render(pipe, source, mark)
        if text.count(mark) != 1:
            raise ModelError(f"{type(pipe).__name__}: its chat template does not write the prompt once; attnctl "
                             "cannot place the prompt's words for excite, regions, maps or edit")
        prefix = text.split(mark)[0]
        return (_leading_specials(tokenizer) if special else 0) + len(tokenizer(prefix, add_special_tokens=False)
                                                                      .input_ids)


def _leading_specials(tokenizer) -> int:
    """How many special tokens the tokenizer puts in front of a text (Mistral's: the begin token; Qwen's: none)."""
    plain = list(tokenizer("a", add_special_tokens=False).input_ids)
    full = list(tokenizer("a").input_ids)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return start
    return 0


__all__ = ["Flux2Adapter"]
