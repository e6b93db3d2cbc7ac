"""The attention computation behind every processor, and its backends.

Shapes throughout: ``q`` (B, H, Sq, D), ``k``/``v`` (B, H, Sk, D), output (B, H, Sq, D).

``attend`` computes ``(1 - u) * softmax(q k^T * scale + bias) v + u * identity_branch`` where ``u`` is an
optional per-(row, head) strength (SoftPAG; u = 1 is PAG's identity map). The identity branch is ``v`` itself
(``mode="full"``) or, for joint attention, attention restricted to the text keys plus each image query's own
token (``mode="image"``: only the image->image block becomes the identity). Backends register in ``BACKENDS``
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
    seq = q.shape[2]
    allowed = torch.zeros(seq, seq, dtype=torch.bool, device=q.device)
    allowed[:, req.text] = True  # every query keeps the text keys
    allowed |= torch.eye(seq, dtype=torch.bool, device=q.device)  # and its own token
    allowed[req.text, :] = True  # text queries are untouched: they see everything
    bias = req.bias[rows] if req.bias is not None and req.bias.shape[0] > 1 else req.bias
    mask = torch.zeros(seq, seq, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    if bias is not None:
        mask = mask + bias
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=req.scale)


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
    O(chunk x Sk) however long the sequence; only the requested columns are kept. Differentiable.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
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
