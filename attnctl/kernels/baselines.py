"""The same function built from stock PyTorch pieces: the SDPA comparator for tests and the benchmark.

``sdpa_blend`` is what a user would write without our kernel: SDPA on every row, a second SDPA with a
dense mask for the image->image identity, then the blend outside. It materialises dense (Sq, Sk) masks, so it
is a baseline, never a code path of the library.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnctl.kernels.reference import image_identity_mask, region_visibility


def dense_bias(q, k, key_bias=None, query_region=None, key_region=None) -> torch.Tensor | None:
    """Additive float mask (B|1, H|1, Sq, Sk) in q's dtype for SDPA, or None when there is nothing to add."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    mask = None
    if key_bias is not None:
        mask = key_bias.to(q.dtype).expand(B, H, Sk)[:, :, None, :].expand(B, H, Sq, Sk)
    if query_region is not None:
        visible = region_visibility(query_region.expand(B, Sq), key_region.expand(B, Sk))  # (B, 1, Sq, Sk)
        hidden = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
        mask = hidden if mask is None else mask + hidden
    return mask


def sdpa_blend(q, k, v, u=None, mode="full", text_range=None, key_bias=None, query_region=None,
               key_region=None, scale=None) -> torch.Tensor:
    """SDPA on all rows, the perturbed map by a masked SDPA (mode "image") or V (mode "full"), then the blend.

    Shapes and meaning as :func:`attnctl.kernels.perturbed_attention`; computed in q's dtype except the
    blend (float32). Rows with every key hidden give 0, as in the kernel.
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = dense_bias(q, k, key_bias, query_region, key_region)
    plain = torch.nan_to_num(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), nan=0.0)
    if u is None or Sq != Sk:
        return plain  # cross-attention: only u == 0 is valid, so there is nothing to blend
    u_t = torch.as_tensor(u, dtype=torch.float32, device=q.device).expand(B, H)[:, :, None, None]
    if mode == "full":
        perturbed = v.float()
    else:
        allowed = image_identity_mask(Sq, text_range, device=q.device)  # (Sq, Sk) with Sq == Sk
        idx = torch.arange(Sq, device=q.device)
        start, end = text_range
        diagonal = (idx[:, None] == idx[None, :]) & ((idx < start) | (idx >= end))[:, None]
        pert_mask = torch.zeros((Sq, Sk), dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        if key_bias is not None:
            pert_mask = pert_mask + key_bias.to(q.dtype).expand(B, H, Sk)[:, :, None, :]
        if query_region is not None:
            visible = region_visibility(query_region.expand(B, Sq), key_region.expand(B, Sk)) | diagonal
            pert_mask = pert_mask.masked_fill(~visible, float("-inf"))
        perturbed = torch.nan_to_num(
            F.scaled_dot_product_attention(q, k, v, attn_mask=pert_mask, scale=scale), nan=0.0
        ).float()
    blend = (1 - u_t) * plain.float() + u_t * perturbed
    return torch.where(u_t == 0, plain.float(), torch.where(u_t == 1, perturbed, blend)).to(q.dtype)
