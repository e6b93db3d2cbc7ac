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

Inversion of a real image (``attnctl.inversion``): the VAE's latents shifted and scaled as the pipeline's decode
path undoes, the list calls through ``to_batch``/``from_batch``, the timestep through ``timestep_offset``/``scale``
and the prediction negated as the pipeline does before its scheduler step (``velocity_sign``).

Not supported: Z-Image-Omni's calls (``x`` a list of image lists with SigLIP features: a clear error). A pipeline call
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
from .base import Adapter, RowList, Site, TextSegment, n_tokens

SEQ_MULTIPLE = 32  # Z-Image pads the image and the caption stream each to a multiple of 32 tokens
_PROMPT_MARK = "\u2063attnctl-prompt\u2063"


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
    # Real images: the VAE is FLUX.1's kind, decoded after ``z / scaling_factor + shift_factor`` (the base class's
    # normalisation); ``latents=`` is that (B, C, H, W) grid, which the transformer patchifies 2x2 itself. The
    # pipeline steps on the negated prediction and has no ``default_sample_size``: it defaults to 1024 pixels.
    velocity_sign = -1.0
    latent_patch = 2
    native_pixels = 1024

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

    def inversion_guidance(self, pipe, guidance_scale):
        return 0.0  # ZImagePipeline runs CFG whenever guidance_scale > 0

    def text_segments(self, pipe):
        """The prompt's tokens start after the chat turn's prefix the pipeline renders around it."""
        tokenizer = pipe.tokenizer
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROMPT_MARK}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
        prefix = rendered.split(_PROMPT_MARK)[0]
        return [TextSegment(tokenizer, len(tokenizer(prefix).input_ids), None)]


__all__ = ["ZImageAdapter"]
