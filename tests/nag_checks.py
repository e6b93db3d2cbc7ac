"""Float64 references for the ``nag`` control's tests (tests/test_nag.py, tests/test_nag_families.py): the NAG
formula written out per token, attention and rotary embeddings in float64, forward-hook recording of a module's
calls, and a ``Nag`` whose negative stream takes a chosen path."""

from __future__ import annotations

import torch

from attnctl.controls.nag import Nag


def nag_reference(pos: torch.Tensor, neg: torch.Tensor, s: float, tau: float, alpha: float, p: int) -> torch.Tensor:
    """The paper's formula on (B, S, C) in float64, written out per token."""
    pos, neg = pos.double(), neg.double()
    out = torch.empty_like(pos)
    for b in range(pos.shape[0]):
        for t in range(pos.shape[1]):
            zp, zn = pos[b, t], neg[b, t]
            z = zp + s * (zp - zn)
            ratio = z.abs().pow(p).sum().pow(1 / p) / zp.abs().pow(p).sum().pow(1 / p)
            if ratio > tau:
                z = z * tau / ratio
            out[b, t] = alpha * z + (1 - alpha) * zp
    return out


def attention64(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v in float64; q/k/v (B, H, S, D); ``mask`` broadcastable to the scores,
    boolean (True: may attend) or added to them, or None."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return torch.softmax(scores, dim=-1) @ v


def heads(x, n):
    """(B, S, H*D) -> (B, H, S, D)."""
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def merge(x):
    """(B, H, S, D) -> (B, S, H*D)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def rope64(x, freqs):
    """A rotary embedding on (B, S, H, D) in float64: ``freqs`` a (cos, sin) pair of (S, D) (FLUX's interleaved
    real form), or complex (S, D/2) or (B, S, D/2) (Qwen-Image, Z-Image)."""
    x = x.double()
    if isinstance(freqs, tuple):
        cos, sin = (f.double()[None, :, None, :] for f in freqs)
        real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return x * cos + torch.stack([-imag, real], dim=-1).flatten(3) * sin
    freqs = freqs.to(torch.complex128)
    freqs = freqs[None, :, None, :] if freqs.ndim == 2 else freqs[:, :, None, :]
    return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * freqs).flatten(3)


def capped_share(pos, neg, s, tau):
    """Share of tokens (B, S, C) whose L1 ratio ||Z~|| / ||Z+|| exceeds tau."""
    guided = pos + s * (pos - neg)
    return float((guided.abs().sum(-1) / pos.abs().sum(-1) > tau).double().mean())


def record(module):
    """Forward hooks recording (inputs, output) of every call of a module (a first positional argument is
    recorded as ``hidden_states``)."""
    calls = []

    def hook(mod, args, kwargs, out):
        inputs = dict(kwargs)
        if args:
            inputs["hidden_states"] = args[0]
        calls.append((inputs, out))

    return calls, module.register_forward_hook(hook, with_kwargs=True)


def nag(path="text", **options):
    """A Nag control whose negative stream takes ``path``: "text" (the blocks' text side only, the default) or
    "block" (the whole block once more, the reference)."""
    control = Nag(**options)
    control.text_only = path == "text"
    return control
