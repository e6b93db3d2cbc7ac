"""Plain-PyTorch reference for perturbed attention (PAG / SoftPAG, full or image->image identity).

This file is the *definition* of what :func:`attnctl.kernels.perturbed.perturbed_attention` computes. It
materialises the (B, H, Sq, Sk) score matrix, so it is meant for tests and as the CPU fallback, not for
large sequences on a GPU.

For every batch row b and head h, with ``u = u[b, h]``::

    out = (1 - u) * softmax(S) @ V + u * P
    S   = Q @ K^T * scale  (+ key_bias)  (with region masking: -inf where a key is hidden)

where the perturbed part ``P`` depends on ``mode``:

* ``"full"`` (PAG, arXiv 2403.17377; SoftPAG, arXiv 2506.10978): the attention map is the identity, so
  ``P = V`` (needs Sq == Sk). For u == 1 no Q K^T is needed at all.
* ``"image"`` (HeadHunter's "image->image identity" for MM-DiT joint attention): the image->image block of
  the map is replaced by the identity while the image->text block is kept and renormalised. An image query
  i attends, in its perturbed map, to the text keys and to its own token only:
  ``P_i = softmax(S_i restricted to text keys + key i) @ V``. Text queries are unchanged (``P_i`` = their
  plain output). The text span is ``text_range = (text_start, text_end)`` in the joint sequence (SD3 puts
  text after the image tokens, FLUX before).

Masks and bias (never a dense S x S tensor):

* ``key_bias`` (B|1, H|1, Sk): added to every query's score for that key (in the perturbed map too).
* ``query_region`` (B|1, Sq) and ``key_region`` (B|1, Sk), integer: a key with region id r >= 0 is visible
  only to queries whose region id is r; a key with id -1 is visible to every query.
  In mode "image" the query's own token (the identity's diagonal) is always visible in the perturbed map,
  just as mode "full" returns V whatever the mask says: the identity is not subject to region masks.
* A row whose keys are all hidden gets a zero plain output (not NaN).
"""

from __future__ import annotations

import math

import torch

from attnctl.errors import ControlError

MODES = ("full", "image")


def _masked_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that maps a row of all ``-inf`` to zeros instead of NaN."""
    row_max = scores.amax(dim=-1, keepdim=True)
    # A fully hidden row has max -inf; shifting by 0 keeps exp(-inf) = 0 instead of exp(nan).
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def region_visibility(query_region: torch.Tensor, key_region: torch.Tensor) -> torch.Tensor:
    """Dense visibility from region ids, for references and tests only.

    query_region: (B|1, Sq) int, key_region: (B|1, Sk) int -> (B|1, 1, Sq, Sk) bool, True = visible.
    """
    kr = key_region[:, None, None, :]
    qr = query_region[:, None, :, None]
    return (kr < 0) | (kr == qr)


def image_identity_mask(seq_len: int, text_range: tuple[int, int], device=None) -> torch.Tensor:
    """Dense (S, S) bool map of the mode-"image" perturbed attention, for references and tests only.

    Row i (a query) is True at the keys it may see: every key for text queries (they are unchanged), and
    the text keys plus key i itself for image queries.
    """
    start, end = text_range
    idx = torch.arange(seq_len, device=device)
    key_is_text = (idx >= start) & (idx < end)
    query_is_text = key_is_text
    allowed = key_is_text[None, :] | (idx[:, None] == idx[None, :]) | query_is_text[:, None]
    return allowed


def perturbed_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor | float | None = None,
    mode: str = "full",
    text_range: tuple[int, int] | None = None,
    key_bias: torch.Tensor | None = None,
    query_region: torch.Tensor | None = None,
    key_region: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference perturbed attention; see the module docstring for the definition.

    q: (B, H, Sq, D); k, v: (B, H, Sk, D); u: (B, H) float (or broadcastable to it, or a float; None = 0);
    key_bias: (B|1, H|1, Sk); query_region: (B|1, Sq) int; key_region: (B|1, Sk) int;
    scale: defaults to 1 / sqrt(D). Returns (B, H, Sq, D) in q's dtype (written into ``out`` if given).
    Computes in float32 for half-precision inputs and in float64 for float64 inputs.
    """
    if mode not in MODES:
        raise ControlError(f"perturbed attention: mode must be one of {MODES}, got {mode!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ControlError(
            f"perturbed attention: q, k, v must be (B, H, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    scores = (qc @ kc.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if key_bias is not None:
        scores = scores + key_bias.to(compute).expand(B, H, Sk)[:, :, None, :]
    unmasked = scores  # kept for the identity diagonal, which region masks never hide
    if (query_region is None) != (key_region is None):
        raise ControlError("perturbed attention: give both query_region and key_region, or neither")
    if query_region is not None:
        visible = region_visibility(query_region.expand(B, Sq), key_region.expand(B, Sk))
        scores = scores.masked_fill(~visible, float("-inf"))
    plain = _masked_softmax(scores) @ vc

    if u is None:
        result = plain
    else:
        u_t = torch.as_tensor(u, dtype=compute, device=q.device).expand(B, H)[:, :, None, None]
        if not bool((u_t != 0).any()):
            result = plain
        else:
            if Sq != Sk:
                raise ControlError(
                    f"perturbed attention: u != 0 needs self/joint attention (Sq == Sk), got Sq={Sq}, Sk={Sk}; "
                    "use u = 0 for cross-attention layers"
                )
            if mode == "full":
                perturbed = vc
            else:
                if text_range is None:
                    raise ControlError('perturbed attention: mode="image" needs text_range=(text_start, text_end)')
                start, end = int(text_range[0]), int(text_range[1])
                allowed = image_identity_mask(Sq, (start, end), device=q.device)
                idx = torch.arange(Sq, device=q.device)
                query_is_image = (idx < start) | (idx >= end)
                # Image queries' own token: the identity's diagonal, never hidden by region masks.
                diagonal = (idx[:, None] == idx[None, :]) & query_is_image[:, None]
                pert_scores = torch.where(diagonal, unmasked, scores).masked_fill(~allowed, float("-inf"))
                perturbed = _masked_softmax(pert_scores) @ vc
            blend = (1 - u_t) * plain + u_t * perturbed
            # Exact endpoints: u = 0 never depends on the perturbed branch, u = 1 never on the plain one
            # (so a NaN in Q of a fully perturbed full-mode row cannot leak, as in the kernel).
            result = torch.where(u_t == 0, plain, torch.where(u_t == 1, perturbed, blend))
    result = result.to(q.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result
