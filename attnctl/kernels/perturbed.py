"""Perturbed attention on the GPU (layers 2 and 3: launcher and public function).

``perturbed_attention`` computes exactly what :func:`attnctl.kernels.reference.perturbed_attention_ref`
defines (read its module docstring for the maths) with the Triton kernel in ``perturbed_kernel.py``:
one launch for the whole [uncond, cond, perturbed] batch, per-(row, head) blend weights ``u``, no S x S
matrix in memory, u == 1 rows of mode "full" never reading Q or K.

This module does not import triton at import time; :func:`is_available` says whether a call can run.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import torch

from attnctl.errors import ControlError
from attnctl.kernels.reference import MODES

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# Blocks used under TRITON_INTERPRET=1 (no autotuning on the CPU): small enough that short test sequences
# still cross several key blocks and ragged edges, large enough to keep the interpreter bearable.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks triton to run kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel_module() -> ModuleType:
    """The module holding the ``@triton.jit`` kernels, (re)built for the current TRITON_INTERPRET setting.

    triton decides between compiling and interpreting when the decorators run, so a module imported under
    one setting is reloaded if a caller (a test fixture) changed the variable since.
    """
    module = importlib.import_module("attnctl.kernels.perturbed_kernel")
    if module.INTERPRETED != interpreting():
        module = importlib.reload(module)
    return module


def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def is_available(q: torch.Tensor) -> bool:
    """Whether :func:`perturbed_attention` can run for a query tensor like ``q`` (B, H, S, D).

    Needs triton, a supported dtype (float16, bfloat16, float32), head_dim <= 256, and either a CUDA tensor
    or TRITON_INTERPRET=1 with a CPU tensor (the interpreter; slow, for tests).
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return False
    if q.dtype not in SUPPORTED_DTYPES or not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return False
    if q.is_cuda:
        if interpreting():
            return False
    elif not (interpreting() and q.device.type == "cpu"):
        return False
    return _triton_importable()


def _seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of two, so 4096 and 4429 tune separately but
    4429 and 4608 share configs, and a new resolution does not re-tune on every few tokens."""
    return 1 << max(4, (max(int(n), 1) - 1).bit_length())


def _broadcast_to(t: torch.Tensor, shape: tuple[int, ...], name: str, expected: str) -> torch.Tensor:
    try:
        return t.expand(shape)
    except RuntimeError:
        raise ControlError(
            f"perturbed attention: {name} has shape {tuple(t.shape)}, expected {expected} "
            f"(broadcastable to {tuple(shape)})"
        ) from None


def _validate(q, k, v, u, mode, text_range, key_bias, query_region, key_region, scale, out):
    """Check every user input and return the normalised extras: (u (B, H) float32, text range, bias, regions)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ControlError(f"perturbed attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ControlError(f"perturbed attention: {name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
    if mode not in MODES:
        raise ControlError(f"perturbed attention: mode must be one of {MODES}, got {mode!r}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ControlError(f"perturbed attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ControlError(
            f"perturbed attention: dtype {q.dtype} is not supported; use one of float16, bfloat16, float32"
        )
    if not (q.device == k.device == v.device):
        raise ControlError(f"perturbed attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    B, H, Sq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ControlError(
            f"perturbed attention: batch and heads must match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ControlError(f"perturbed attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ControlError(f"perturbed attention: q head_dim {D} != k/v head_dim {k.shape[3]}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ControlError(f"perturbed attention: head_dim {D} is not supported (1..{MAX_HEAD_DIM})")
    Sk = k.shape[2]
    if Sq == 0 or Sk == 0 or B == 0 or H == 0:
        raise ControlError(f"perturbed attention: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ControlError(
                f"perturbed attention: {name}'s last dimension (head_dim) must be contiguous, got strides "
                f"{t.stride()}; pass {name}.contiguous() (other dims may be strided, e.g. a (B, S, H, D) view)"
            )

    if u is None:
        u_t = torch.zeros((B, H), dtype=torch.float32, device=q.device)
    else:
        u_t = torch.as_tensor(u, device=q.device)
        if u_t.is_complex() or not (u_t.is_floating_point() or u_t.dtype in (torch.int32, torch.int64)):
            raise ControlError(f"perturbed attention: u must be a float tensor (B, H), got dtype {u_t.dtype}")
        if u_t.device != q.device:
            raise ControlError(f"perturbed attention: u is on {u_t.device}, q on {q.device}")
        u_t = _broadcast_to(u_t.to(torch.float32), (B, H), "u", "(B, H)")

    if Sq != Sk and u is not None and bool((u_t != 0).any()):
        # The identity (and the image identity) pairs query i with key i; cross-attention has no such pairing.
        raise ControlError(
            f"perturbed attention: u != 0 needs self or joint attention (Sq == Sk), got Sq={Sq}, Sk={Sk}; "
            "perturb self-attention layers only, or pass u=0 for cross-attention"
        )
    start, end = 0, 0
    if mode == "image":
        if text_range is None:
            raise ControlError(
                'perturbed attention: mode="image" needs text_range=(text_start, text_end), the text tokens\' span '
                "in the joint sequence (SD3: (n_image, n_image + n_text); FLUX: (0, n_text))"
            )
        try:
            start, end = (int(x) for x in text_range)
        except (TypeError, ValueError):
            raise ControlError(f"perturbed attention: text_range must be two ints, got {text_range!r}") from None
        if not 0 <= start <= end <= Sk:
            raise ControlError(
                f"perturbed attention: text_range {text_range!r} must satisfy 0 <= start <= end <= {Sk} (Sk)"
            )
    elif text_range is not None:
        raise ControlError('perturbed attention: text_range is only used with mode="image"')

    bias = None
    if key_bias is not None:
        if not isinstance(key_bias, torch.Tensor) or not key_bias.is_floating_point():
            raise ControlError("perturbed attention: key_bias must be a float tensor (B|1, H|1, Sk)")
        if key_bias.dim() != 3:
            raise ControlError(
                f"perturbed attention: key_bias must be (B|1, H|1, Sk) = a per-key bias, got shape {tuple(key_bias.shape)}; "
                "dense (Sq, Sk) masks are not supported, use query_region/key_region"
            )
        if key_bias.device != q.device:
            raise ControlError(f"perturbed attention: key_bias is on {key_bias.device}, q on {q.device}")
        bias = _broadcast_to(key_bias, (B, H, Sk), "key_bias", "(B|1, H|1, Sk)")
        if bias.stride(-1) != 1 and Sk > 1:
            bias = bias.contiguous()

    regions = None
    if (query_region is None) != (key_region is None):
        raise ControlError("perturbed attention: give both query_region (B|1, Sq) and key_region (B|1, Sk), or neither")
    if query_region is not None:
        for name, t, n in (("query_region", query_region, Sq), ("key_region", key_region, Sk)):
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8):
                raise ControlError(f"perturbed attention: {name} must be an integer tensor (B|1, {n}) of region ids")
            if t.dim() != 2:
                raise ControlError(f"perturbed attention: {name} must be 2-D (B|1, {n}), got shape {tuple(t.shape)}")
            if t.device != q.device:
                raise ControlError(f"perturbed attention: {name} is on {t.device}, q on {q.device}")
        qr = _broadcast_to(query_region.to(torch.int32), (B, Sq), "query_region", "(B|1, Sq)")
        kr = _broadcast_to(key_region.to(torch.int32), (B, Sk), "key_region", "(B|1, Sk)")
        regions = (qr if qr.stride(-1) == 1 or Sq == 1 else qr.contiguous(),
                   kr if kr.stride(-1) == 1 or Sk == 1 else kr.contiguous())

    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ControlError(f"perturbed attention: scale must be a finite float, got {scale!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ControlError(
                f"perturbed attention: out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}"
            )
        if out.stride(-1) != 1:
            raise ControlError("perturbed attention: out's last dimension must be contiguous")
    return u_t, (start, end), bias, regions


def launch_perturbed_attention(
    q, k, v, u=None, mode="full", text_range=None, key_bias=None, query_region=None, key_region=None,
    scale=None, out=None, *, block_m: int | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """Validate, build the grid and launch the kernel; writes every element of ``out`` (allocated if None).

    Shapes as in :func:`perturbed_attention`. ``block_m``/``block_n`` pin the tile sizes (tests); by default
    the autotuned configs run on CUDA and 32 x 32 tiles under the interpreter.
    """
    u_t, (start, end), bias, regions = _validate(
        q, k, v, u, mode, text_range, key_bias, query_region, key_region, scale, out
    )
    if not is_available(q):
        raise ControlError(
            f"perturbed attention: the Triton kernel cannot run here (device {q.device}, dtype {q.dtype}, "
            f"triton importable: {_triton_importable()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}); "
            "use attnctl.kernels.perturbed_attention_ref, or a CUDA tensor"
        )
    kernels = _kernel_module()
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    if out is None:
        out = torch.empty_like(q)  # keeps q's layout: a (B, S, H, D) view in gives one out
    block_d = max(16, 1 << (D - 1).bit_length())  # tl.dot needs >= 16; odd sizes (40, 80, 160) are masked
    qk_scale = (1.0 / math.sqrt(D) if scale is None else float(scale)) * 1.4426950408889634

    dummy = q  # never dereferenced when the matching flag is off
    if bias is not None:
        bias_t, bias_strides = bias, bias.stride()
    else:
        bias_t, bias_strides = dummy, (0, 0, 0)
    if regions is not None:
        qr, kr = regions
        reg_args, reg_strides = (qr, kr), (qr.stride(0), qr.stride(1), kr.stride(0), kr.stride(1))
    else:
        reg_args, reg_strides = (dummy, dummy), (0, 0, 0, 0)

    args = (
        q, k, v, u_t, out, bias_t, *reg_args,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        u_t.stride(0), u_t.stride(1),
        *bias_strides, *reg_strides,
        H, Sq, Sk, start, end, qk_scale,
        _seq_bucket(Sq), _seq_bucket(Sk),
    )
    meta = dict(
        HEAD_DIM=D, BLOCK_D=block_d, MODE_IMAGE=int(mode == "image"), HAS_BIAS=int(bias is not None),
        HAS_REGION=int(regions is not None), IS_FP32=int(q.dtype == torch.float32),
    )
    if block_m is None and block_n is None and not interpreting():
        def grid(cfg):
            return (triton_cdiv(Sq, cfg["BLOCK_M"]), B * H)

        kernels.perturbed_attention_fwd_tuned[grid](*args, **meta)
    else:
        bm = block_m or INTERPRET_BLOCK_M
        bn = block_n or INTERPRET_BLOCK_N
        if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
            raise ControlError(f"perturbed attention: block sizes must be powers of two >= 16, got {bm}, {bn}")
        kernels.perturbed_attention_fwd[(triton_cdiv(Sq, bm), B * H)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def perturbed_attention(
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
    """Fused (1 - u) * attention + u * identity-perturbed attention, one Triton launch for all rows.

    q: (B, H, Sq, D); k, v: (B, H, Sk, D), same dtype (float16, bfloat16 or float32) and device, last dim
    contiguous (a ``.transpose(1, 2)`` view of (B, S, H, D) is fine). D <= 256 (odd sizes are padded).
    u: (B, H) float blend weight per batch row and head (or broadcastable, or a float; None = all 0).
    mode: "full" (identity map, perturbed output = V) or "image" (image->image identity of joint attention,
    needs text_range=(text_start, text_end)). u != 0 needs Sq == Sk.
    key_bias: (B|1, H|1, Sk) additive score bias per key. query_region (B|1, Sq), key_region (B|1, Sk):
    integer region ids; a key with id r >= 0 is seen only by queries with id r, id -1 by all.
    scale: score scale, default 1/sqrt(D). out: optional (B, H, Sq, D) tensor to write into.
    Returns (B, H, Sq, D) in q's dtype and memory layout. Raises ControlError on bad input or when the
    kernel cannot run here (see :func:`is_available`); the definition is ``perturbed_attention_ref``.
    """
    return launch_perturbed_attention(
        q, k, v, u, mode, text_range, key_bias, query_region, key_region, scale, out
    )


# --- Adapter for the engine's backend registry (attnctl.attention.BACKENDS["triton"]) ---------------------
# Duck-typed on AttentionRequest's fields (q, k, v, bias, u, mode, text, scale) so this module does not
# import the engine.


def _request_key_bias(req) -> tuple[bool, torch.Tensor | None]:
    """(ok, key_bias): the request's bias as a per-key (B|1, H|1, Sk) bias, or ok=False for a dense one."""
    bias = getattr(req, "bias", None)
    if bias is None:
        return True, None
    if not isinstance(bias, torch.Tensor) or bias.dim() > 4:
        return False, None
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    if bias.shape[-2] != 1:
        return False, None  # depends on the query: a dense mask, which this kernel never takes
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device).masked_fill(~bias, float("-inf"))
    Sk = req.k.shape[2]
    return True, bias[:, :, 0, :].expand(bias.shape[0], bias.shape[1], Sk)


def _request_text_range(req) -> tuple[int, int] | None:
    text = getattr(req, "text", None)
    if text is None:
        return None
    start, stop, step = text.indices(req.k.shape[2])
    if step != 1:
        raise ControlError(f"perturbed attention: the text span must be contiguous, got {text!r}")
    return start, stop


def supports_request(req) -> bool:
    """Whether the kernel can serve an ``attnctl.attention.AttentionRequest`` (else the engine uses SDPA):
    CUDA (or the interpreter), supported dtype/head_dim, a bias that is per key (never dense), text as a
    contiguous slice."""
    if not is_available(req.q):
        return False
    if getattr(req, "mode", "full") not in MODES:
        return False
    ok, _ = _request_key_bias(req)
    if not ok:
        return False
    text = getattr(req, "text", None)
    return text is None or text.step in (None, 1)


def run_request(req) -> torch.Tensor:
    """Run an ``AttentionRequest`` on the kernel: (B, H, Sq, D) out, same meaning as ``attend_reference``.

    Mode "image" without a text span is the plain identity ("image" with an empty text span gives V too).
    """
    _, key_bias = _request_key_bias(req)
    mode = getattr(req, "mode", "full")
    text_range = _request_text_range(req) if mode == "image" else None
    if mode == "image" and text_range is None:
        text_range = (0, 0)  # no text tokens: each image query's perturbed map is its own token = V
    return perturbed_attention(req.q, req.k, req.v, u=req.u, mode=mode, text_range=text_range,
                               key_bias=key_bias, scale=req.scale)
