"""Z-Image (``ZImagePipeline``: Z-Image and Z-Image-Turbo): one single-stream DiT over [image; text].

``ZImageTransformer2DModel`` runs three stacks of ``ZImageTransformerBlock``, each with one diffusers ``Attention``
(``.attention``) whose ``ZSingleStreamAttnProcessor`` applies qk-norm and RoPE and calls ``dispatch_attention_fn``
once, (B, S, H, D):

``noise_refiner.<i>.attention``    kind ``self``: the image tokens alone (timestep-modulated). Controllable
                                   (perturb; regions' and maps' text-free parts do not apply).
``context_refiner.<i>.attention``  the caption tokens alone (text-only self-attention, no image tokens). Not a site:
                                   no control acts there, and a selector naming it matches nothing.
``layers.<i>.attention``           kind ``single``: the joined sequence [image; text] through shared projections.
                                   Every control acts here.

Token layout: each row's image patches (2x2, ``h * w`` tokens) are padded to a multiple of 32 tokens and its
caption features (the prompt's valid tokens only, so rows differ in length) likewise; the main layers see
[image; image padding; caption; caption padding], rows padded to the longest with a boolean key mask. So in a
main-layer call the image span is the first ``h * w`` queries, the text span every key after the padded image
(``X = ceil(h * w / 32) * 32`` on): a row's batch padding there is masked by the call's own mask. Caption positions
are those of the Qwen3 chat turn the pipeline renders (``<|im_start|>user\\n{prompt}<|im_end|>\\n...``): the
prompt's tokens start after the turn's prefix.

Calls: the transformer takes lists (``x``: one (C, 1, H, W) latent per row, ``cap_feats``: one (L_i, C) caption
per row) and returns a list. ``to_batch`` stacks the latents into the pipeline's (B, C, H, W) and marks the
captions as a ``RowList``; the prediction list is stacked likewise and unstacked on return. The timestep the
transformer sees is ``(1000 - t) / 1000``. CFG runs in one batch as [cond; uncond] (``prompt_embeds +
negative_prompt_embeds``) and combines ``cond + w (cond - uncond)``, weights summing to one, so PAG's delta folded
into both rows reaches the result once; ``cfg_normalization`` then caps the result's norm by the cond rows', which
include that delta. ``cfg_truncation`` drops CFG at late steps: those calls hold the cond rows only. Z-Image-Turbo
(``guidance_scale=0``) runs no CFG: every call is cond rows. Extra rows run from the first block (the transformer
unpatchifies per input row after its blocks, so rows cannot join inside).

A second text stream (the ``nag`` control's negative prompt, ``start_text``): its caption goes through the
transformer's caption path (``cap_embedder``, padding to 32 with ``cap_pad_token``, the caption refiner) once per
denoiser call and runs beside the prompt's in the main layers, where a block's input is [image; negative
caption]. Its main-layer positions are shifted so that it ends where the call's own caption ends (the image
tokens' positions follow the call's caption): the relative positions of a call of the negative prompt.

Not supported: Z-Image-Omni's calls (``x`` a list of image lists with SigLIP features: a clear error), inversion
of a real image (the Z-Image VAE's shift and scaling are not wired into ``attnctl.inversion``). A pipeline call
given ``prompt_embeds`` without a prompt never calls ``encode_prompt``: it starts at ``prepare_latents``
(``call_start_methods``) with its prompts unknown, so its CFG batch is read from ``do_classifier_free_guidance``
alone (a ``cfg_truncation`` step then needs an odd row count or prompts to be told apart) and word-level controls
say they need the prompt text.
"""

from __future__ import annotations

import torch

from .. import layouts
from ..errors import LayoutError
from ..intercept import Tokens
from .base import Adapter, RowList, SecondText, Site, TextPass, TextSegment, n_tokens

SEQ_MULTIPLE = 32  # Z-Image pads the image and the caption stream each to a multiple of 32 tokens
_PROMPT_MARK = "\u2063attnctl-prompt\u2063"


def _caption_rope(embedder, positions: torch.Tensor) -> torch.Tensor:
    """The rotary embedding (S, D/2) complex64 that ``RopeEmbedder`` gives caption tokens at time positions
    ``positions`` (S,) (any integers, also below 0; height and width 0), computed as it precomputes its table."""
    parts = []
    for axis, dim in enumerate(embedder.axes_dims):
        freqs = 1.0 / (embedder.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        at = positions.cpu().to(torch.float64) if axis == 0 else torch.zeros(len(positions), dtype=torch.float64)
        angles = torch.outer(at, freqs).float()
        parts.append(torch.polar(torch.ones_like(angles), angles).to(torch.complex64))
    return torch.cat(parts, dim=-1).to(positions.device)


def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


class ZImageAdapter(Adapter):
    family = "zimage"
    denoiser_attr = "transformer"
    latent_arg = "x"
    text_arg = "cap_feats"
    timestep_arg = "t"
    timestep_scale = -1000.0  # the pipeline passes (1000 - t) / 1000
    timestep_offset = 1000.0
    denoiser_class = "diffusers:ZImageTransformer2DModel"
    unbatched_args = frozenset({"patch_size", "f_patch_size"})
    block_attrs = ()  # extra rows cannot join inside: the transformer unpatchifies per input row
    late_rows_blockers = frozenset({"controlnet_block_samples"})
    cfg_order = ("cond", "uncond")
    call_start_methods = ("prepare_latents",)  # given prompt_embeds without a prompt, no encode_prompt runs
    layout_kinds = (layouts.CFG_BATCH, layouts.COND_BATCH, layouts.UNCOND_CALL, layouts.OUTSIDE)
    inversion_unsupported = ("Z-Image latents are shifted and scaled by its VAE and its transformer takes per-row "
                             "lists, which attnctl's inversion does not implement; edit by prompt without an "
                             "inverted image")

    def sites(self, denoiser):
        """The image refiner's (``self``) and the main layers' (``single``) attention modules in model order; the
        caption refiner's are left out (text only: nothing for a control to act on)."""
        cls, found = self.module_class(), []
        for name, module in denoiser.named_modules():
            if not isinstance(module, cls) or name.startswith("context_refiner."):
                continue
            kind = "self" if name.startswith("noise_refiner.") else "single"
            head_dim = module.to_q.out_features // module.heads
            found.append((Site(name, kind, module.heads, head_dim, len(found)), module))
        return found

    def kind_of(self, module):
        raise NotImplementedError("Z-Image's kinds follow the stack a module is in: see sites()")

    def tokens(self, site, inputs, frame):
        total = n_tokens(inputs["hidden_states"])
        h, w = frame.latent_hw
        n_image = h * w
        if site.kind == "self":  # the image refiner: image tokens, then their padding
            return Tokens(None, slice(0, n_image), total, total)
        start = -(-n_image // SEQ_MULTIPLE) * SEQ_MULTIPLE
        return Tokens(slice(start, total), slice(0, n_image), total, total)

    # -- the call's lists as one batch ----------------------------------------------------------------------
    def to_batch(self, params):
        x = params.get("x")
        if not isinstance(x, (list, tuple)):
            return params  # already a batch (attnctl's own calls go through from_batch first)
        if x and isinstance(x[0], (list, tuple)):
            raise LayoutError("ZImageTransformer2DModel called in omni mode (x holds a list of images per row, as "
                              "Z-Image-Omni's pipeline does): attnctl supports Z-Image's text-to-image calls, one "
                              "latent per row")
        latents = torch.stack(list(x))  # (B, C, F, H, W)
        if latents.shape[2] == 1:
            latents = latents.squeeze(2)  # the pipeline's own (B, C, H, W)
        params = dict(params, x=latents)
        if isinstance(params.get("cap_feats"), (list, tuple)):
            params["cap_feats"] = RowList(params["cap_feats"])
        return params

    def from_batch(self, params):
        x = params.get("x")
        if not isinstance(x, torch.Tensor):
            return params
        if x.ndim == 4:
            x = x.unsqueeze(2)
        params = dict(params, x=list(x.unbind(0)))
        if isinstance(params.get("cap_feats"), RowList):
            params["cap_feats"] = list(params["cap_feats"])
        return params

    def sample_to_batch(self, sample):
        if isinstance(sample, torch.Tensor):
            return sample
        out = torch.stack(list(sample))
        return out.squeeze(2) if out.shape[2] == 1 else out

    def sample_from_batch(self, sample):
        if not isinstance(sample, torch.Tensor):
            return sample
        if sample.ndim == 4:
            sample = sample.unsqueeze(2)
        return list(sample.unbind(0))

    def latent_hw(self, params):
        x = params.get("x")
        if not isinstance(x, torch.Tensor):
            return None
        patch = int(params.get("patch_size", 2) or 2)
        return int(x.shape[-2]) // patch, int(x.shape[-1]) // patch

    def call_kind(self, call):
        """Inside a pipeline call, ``do_classifier_free_guidance`` says whether the batch is [cond; uncond]; a call
        with as many rows as the pipeline call has images while it holds is a step ``cfg_truncation`` left
        without CFG. A diffusers guider (modular pipelines) names each call's prediction."""
        if call.guider is not None:
            return layouts.guider_kind(call)
        if not call.in_pipeline:
            return layouts.OUTSIDE
        if call.cfg is None:
            return super().call_kind(call)  # the LayoutError naming the missing property
        if call.cfg and not (call.samples is not None and call.rows == call.samples):
            return layouts.CFG_BATCH
        return layouts.COND_BATCH

    def text_segments(self, pipe):
        """The prompt's tokens start after the chat turn's prefix the pipeline renders around it."""
        tokenizer = pipe.tokenizer
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROMPT_MARK}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
        prefix = rendered.split(_PROMPT_MARK)[0]
        return [TextSegment(tokenizer, len(tokenizer(prefix).input_ids), None)]

    # -- a second text stream (the ``nag`` control) ---------------------------------------------------------

    text_stream = True
    text_own_length = True  # captions keep their real tokens only: each its own length

    def encode_text(self, pipe, prompts, text_len, device, dtype):
        """The pipeline's own chat template and Qwen3 encoding (one (L_i, C) caption of real tokens per text),
        padded to the longest with a mask of the real tokens."""
        captions = type(pipe).encode_prompt(pipe, list(prompts), device=device, do_classifier_free_guidance=False)[0]
        lengths = [len(c) for c in captions]
        embeds = torch.nn.utils.rnn.pad_sequence(list(captions), batch_first=True)
        mask = torch.arange(max(lengths), device=embeds.device)[None, :] < torch.tensor(lengths, device=embeds.device
                                                                                       )[:, None]
        return embeds.to(device=device, dtype=dtype), mask.to(device)

    def start_text(self, denoiser, text, mask, params, rows):
        """The caption path of ``ZImageTransformer2DModel`` for the second text: ``cap_embedder``, padding to a
        multiple of 32 with ``cap_pad_token``, the caption refiner (positions 1..L, as the transformer gives a
        caption), then the stream the main layers read. There its positions are shifted so that it ends where the
        call's own caption ends (each guided row's), right before the image tokens (whose positions follow the
        call's caption): the same relative positions as a call of this caption, wherever the image has no padding
        tokens (their position is 0 in either)."""
        from torch.nn.utils.rnn import pad_sequence

        lengths = [int(n) for n in mask.sum(1)] if mask is not None else [text.shape[1]] * text.shape[0]
        padded = [_padded(n) for n in lengths]
        raw = [torch.cat([text[i, :n], text[i, n - 1:n].expand(p - n, -1)]) for i, (n, p) in enumerate(
            zip(lengths, padded))]
        is_pad = torch.cat([torch.arange(p, device=text.device) >= n for n, p in zip(lengths, padded)])
        feats = denoiser.cap_embedder(torch.cat(raw))
        feats = torch.where(is_pad[:, None], denoiser.cap_pad_token, feats)
        tokens = pad_sequence(list(feats.split(padded)), batch_first=True, padding_value=0.0)
        embedder = denoiser.rope_embedder
        ids = [torch.stack([torch.arange(1, p + 1), torch.zeros(p, dtype=torch.long), torch.zeros(p, dtype=torch.long)],
                           dim=1).to(device=text.device, dtype=torch.int32) for p in padded]
        freqs = pad_sequence([embedder(i) for i in ids], batch_first=True, padding_value=0.0)
        longest = max(padded)
        batch_mask = None
        if any(p != longest for p in padded):
            batch_mask = torch.arange(longest, device=text.device)[None, :] < torch.tensor(padded, device=text.device
                                                                                          )[:, None]
        for layer in denoiser.context_refiner:
            tokens = layer(tokens, batch_mask, freqs)
        captions = params["cap_feats"]
        own = [_padded(len(captions[r])) for r in rows]
        rope = pad_sequence([_caption_rope(embedder, torch.arange(o - p + 1, o + 1, device=text.device))
                             for o, p in zip(own, padded)], batch_first=True, padding_value=0.0)
        h, w = self.latent_hw(params)
        return SecondText(tokens, batch_mask, rope, slice(_padded(h * w), None))

    def text_blocks(self, denoiser):
        return [(f"layers.{i}", layer) for i, layer in enumerate(denoiser.layers)]

    def with_text(self, block, inputs, text):
        """[the call's padded image tokens; the second caption], with their rotary embedding and key mask."""
        start, x = text.joined.start, inputs["x"]
        mask = None
        if text.mask is not None:
            mask = torch.cat([torch.ones(x.shape[0], start, dtype=torch.bool, device=x.device), text.mask], dim=1)
        return dict(inputs, x=torch.cat([x[:, :start], text.tokens.to(x.dtype)], dim=1), attn_mask=mask,
                    freqs_cis=torch.cat([inputs["freqs_cis"][:, :start], text.rope], dim=1))

    def text_after(self, block, out, text):
        return out[:, text.joined.start:]

    def text_pass(self, block, text, inputs):
        """A main layer's text side under the stock ``ZSingleStreamAttnProcessor``: ``attention_norm1`` scaled by
        the layer's modulation of ``adaln_input``, the shared ``to_q/k/v`` and ``norm_q/k`` on the caption tokens,
        its rotary embedding; after attention ``to_out``, ``attention_norm2`` and the gated residual, then the
        feed-forward (``ffn_norm1`` scaled, ``feed_forward``, ``ffn_norm2``, gated): every step but attention is
        per token. The key mask keeps the image tokens and the caption's own tokens (its rows' batch padding
        masked, as the transformer masks a batch's)."""
        from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock, \
            ZSingleStreamAttnProcessor

        attn = getattr(block, "attention", None)
        if (type(block) is not ZImageTransformerBlock or not block.modulation or inputs.get("noise_mask") is not None
                or type(attn.processor) is not ZSingleStreamAttnProcessor or getattr(attn, "fused_projections", False)):
            return None
        stream = text.tokens
        mod = block.adaLN_modulation(inputs["adaln_input"])
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        normed = block.attention_norm1(stream) * (1.0 + scale_msa)
        q, k, v = (f(normed).unflatten(-1, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        def rotate(x):
            turned = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * text.rope.unsqueeze(2)
            return torch.view_as_real(turned).flatten(3).type_as(x)

        q, k = rotate(q), rotate(k)
        mask = None
        if text.mask is not None:
            image = torch.ones(text.mask.shape[0], text.joined.start, dtype=torch.bool, device=text.mask.device)
            mask = torch.cat([image, text.mask], dim=1)[:, None, None, :]

        def finish(out):
            out = attn.to_out[0](out.transpose(1, 2).flatten(2, 3).to(q.dtype))
            if len(attn.to_out) > 1:
                out = attn.to_out[1](out)
            after = stream + gate_msa * block.attention_norm2(out)
            return after + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(after) * (1.0 + scale_mlp)))

        return TextPass(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), finish, mask)


__all__ = ["ZImageAdapter"]

