"""The attention computation of every controlled call (one a control acted on), and its backends.

Shapes throughout: ``q`` (B, H, Sq, D), ``k``/``v`` (B, H, Sk, D), output (B, H, Sq, D).

``attend`` computes ``(1 - u) * softmax(q k^T * scale + bias) v + u * identity_branch`` where ``u`` is an
optional per-(row, head) strength (SoftPAG; u = 1 is PAG's identity map). The identity branch is ``v`` itself
(``mode="full"``) or, for joint attention, attention restricted to the text keys plus each image query's own
token (``mode="image"``: only the image->image block becomes the identity; computed from the image->text
block and the diagonal, O(S_img x S_text) instead of a masked O(S^2) SDPA). Backends register in ``BACKENDS``
with a predicate saying which calls they support; ``ATTNCTL_BACKEND`` (``sdpa`` | ``triton``) forces one.
Maps for chosen keys (``key_probabilities``) are computed in query chunks, never as one SxS matrix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import AttnctlError


@dataclass
class AttentionRequest:
    """Everything one attention computation needs. ``text`` is the text span in the key sequence (or None)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None = None  # additive, broadcastable to (B, H, Sq, Sk); bool masks are converted
    u: torch.Tensor | None = None  # (B, H) strengths in [0, 1]
    mode: str = "full"  # "full" | "image"
    text: slice | None = None
    scale: float | None = None


def _sdpa(req: AttentionRequest) -> torch.Tensor:
    return F.scaled_dot_product_attention(req.q, req.k, req.v, attn_mask=req.bias, dropout_p=0.0, is_causal=False,
                                          scale=req.scale)


def _identity_branch(req: AttentionRequest, rows: torch.Tensor) -> torch.Tensor:
    """The perturbed map's output for ``rows`` (indices into the batch): v, or the image-only identity."""
    q, k, v = req.q[rows], req.k[rows], req.v[rows]
    if req.mode == "full":
        if q.shape[2] != k.shape[2]:
            raise AttnctlError(
                f"an identity perturbation needs queries and keys of one sequence (self or joint attention); "
                f"this call has {q.shape[2]} queries and {k.shape[2]} keys"
            )
        return v
    if req.mode != "image":
        raise AttnctlError(f"unknown perturbation mode {req.mode!r}; allowed: full, image")
    if req.text is None:
        return v  # no text in the sequence: image-only identity is the plain identity
    bias = req.bias[rows] if req.bias is not None and req.bias.shape[0] > 1 else req.bias
    return image_identity(q, k, v, req.text, bias=bias, scale=req.scale)


def _complement(span: slice, seq: int, device) -> slice | torch.Tensor:
    """The positions of ``range(seq)`` outside ``span``: a slice when they are contiguous, else an index tensor."""
    start, stop, _ = span.indices(seq)
    if start == 0:
        return slice(stop, seq)
    if stop == seq:
        return slice(0, start)
    keep = torch.ones(seq, dtype=torch.bool, device=device)
    keep[start:stop] = False
    return torch.nonzero(keep).flatten()


def image_identity(q, k, v, text: slice, *, bias=None, scale: float | None = None) -> torch.Tensor:
    """Joint attention whose image->image block is the identity; (B, H, S, D) out, without an S x S tensor.

    Text queries attend to every key (their plain attention). An image query i attends to the text keys and
    to its own key only, so its scores are the (S_img, S_text) image->text block plus the diagonal
    q_i . k_i: O(S_img * S_text) work instead of the O(S^2) of a masked SDPA. ``bias`` (additive, broadcastable
    to (B, H, S, S)) is added to exactly the scores kept, as a dense mask would.
    """
    seq = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    text = slice(*text.indices(seq)[:2])
    image = _complement(text, seq, q.device)
    out = torch.empty_like(v)
    text_bias = None
    if bias is not None:
        while bias.ndim < 4:
            bias = bias.unsqueeze(0)
        bias = bias.expand(*bias.shape[:2], seq, seq)
        text_bias = bias[:, :, text]
    out[:, :, text] = F.scaled_dot_product_attention(q[:, :, text], k, v, attn_mask=text_bias, dropout_p=0.0,
                                                     scale=scale)
    qi, ki, vi = q[:, :, image], k[:, :, image], v[:, :, image]
    cross = torch.matmul(qi, k[:, :, text].transpose(-1, -2)) * scale  # (B, H, S_img, S_text)
    own = (qi * ki).sum(-1, keepdim=True) * scale  # (B, H, S_img, 1): the diagonal
    if bias is not None:
        positions = torch.arange(seq, device=q.device)[image]
        cross = cross + bias[:, :, image][..., text]
        own = own + bias[:, :, positions, positions].unsqueeze(-1)
    probs = torch.softmax(torch.cat([cross, own], dim=-1), dim=-1)
    n_text = cross.shape[-1]
    out[:, :, image] = torch.matmul(probs[..., :n_text], v[:, :, text]) + probs[..., n_text:] * vi
    return out


def attend_reference(req: AttentionRequest) -> torch.Tensor:
    """SDPA for the plain part, the identity branch only for rows with some u > 0, blended per head."""
    if req.bias is not None and req.bias.dtype == torch.bool:
        req.bias = torch.zeros_like(req.bias, dtype=req.q.dtype).masked_fill(~req.bias, float("-inf"))
    u = req.u
    if u is None or not bool((u > 0).any()):
        return _sdpa(req)
    u = u.to(req.q.dtype)
    out = torch.empty_like(req.q)
    # Rows whose every head has u = 1 skip the softmax attention entirely (their output is the identity branch).
    plain_rows = torch.nonzero(~(u >= 1).all(dim=1)).flatten()
    if plain_rows.numel():
        bias = req.bias[plain_rows] if req.bias is not None and req.bias.shape[0] > 1 else req.bias
        out[plain_rows] = _sdpa(AttentionRequest(req.q[plain_rows], req.k[plain_rows], req.v[plain_rows], bias,
                                                 scale=req.scale))
    rows = torch.nonzero((u > 0).any(dim=1)).flatten()
    identity = _identity_branch(req, rows)
    weight = u[rows][:, :, None, None]
    # torch.where, not arithmetic: rows skipped above hold uninitialised memory that must not leak as NaN.
    out[rows] = torch.where(weight >= 1, identity, (1 - weight) * out[rows] + weight * identity)
    return out


@dataclass(frozen=True)
class Backend:
    name: str
    supports: Callable[[AttentionRequest], bool]
    run: Callable[[AttentionRequest], torch.Tensor]


def _triton_supports(req: AttentionRequest) -> bool:
    try:
        from .kernels import perturbed
    except ImportError:
        return False
    available = getattr(perturbed, "supports_request", None)
    return bool(available and available(req))


def _triton_run(req: AttentionRequest) -> torch.Tensor:
    from .kernels import perturbed

    return perturbed.run_request(req)


# Order = preference. The Triton kernel serves CUDA tensors when importable; SDPA serves everything.
BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", _triton_supports, _triton_run),
    "sdpa": Backend("sdpa", lambda req: True, attend_reference),
}


def attend(req: AttentionRequest, backend: str | None = None) -> torch.Tensor:
    """Compute ``req`` on the forced backend (argument, else ``ATTNCTL_BACKEND``) or the first that supports it."""
    forced = backend or os.environ.get("ATTNCTL_BACKEND") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise AttnctlError(f"unknown attention backend {forced!r}; allowed: {', '.join(BACKENDS)}")
        chosen = BACKENDS[forced]
        if not chosen.supports(req):
            raise AttnctlError(f"attention backend {forced!r} cannot run this call (device {req.q.device}, "
                               f"dtype {req.q.dtype}, head_dim {req.q.shape[-1]})")
        return chosen.run(req)
    if req.q.device.type != "cuda" or req.u is None:
        # Only SDPA runs on CPU. A call without a perturbation (cross-attention, unperturbed layers) is plain
        # attention, where cuDNN/flash SDPA is faster than the Triton kernel (kernels/results: 4096x77
        # cross-attention 0.04 ms vs 0.15 ms on an H100); the kernel pays off only when it fuses a perturbation.
        return BACKENDS["sdpa"].run(req)
    for candidate in BACKENDS.values():
        if candidate.supports(req):
            return candidate.run(req)
    raise AttnctlError("no attention backend supports this call")  # unreachable: sdpa supports all


def key_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor | list[int],
    *,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Attention probabilities of every query for the keys at ``positions``: (B, H, Sq, len(positions)).

    The softmax normaliser runs over all keys, in chunks of ``chunk`` queries, so memory stays
    O(chunk x Sk) however long the sequence; only the requested columns are kept. Differentiable. A boolean
    ``bias`` is a mask (True = may attend), as for SDPA: a processor's own key mask reaches here unchanged.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=bias.device).masked_fill(~bias, float("-inf"))
    positions = torch.as_tensor(positions, device=q.device, dtype=torch.long)
    pieces = []
    for start in range(0, q.shape[2], chunk):
        logits = torch.matmul(q[:, :, start : start + chunk], k.transpose(-1, -2)) * scale
        if bias is not None:
            b = bias[..., start : start + chunk, :] if bias.shape[-2] > 1 else bias
            logits = logits + b
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        pieces.append(torch.exp(logits.index_select(-1, positions) - lse))
    return torch.cat(pieces, dim=2)
