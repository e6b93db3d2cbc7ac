"""``attnctl bench kernel``: the perturbed-attention kernel against SDPA backends and compiled FlexAttention.

Needs a CUDA GPU. Every method runs the same [uncond, cond, perturbed] batch in one process, side by side:

* ``sdpa-flash`` / ``sdpa-cudnn``: plain SDPA on all rows with that backend, *ignoring* the perturbation
  (the cost of unperturbed attention; the throughput yardstick).
* ``sdpa+blend``: SDPA on all rows, the perturbed branch for the perturbed rows (V, or a masked SDPA for the
  image->image identity), blended per head.
* ``sdpa+separate``: what diffusers' PAG processors do: SDPA on [uncond, cond], then the perturbed row on its
  own (V for the identity; a dense-mask SDPA for joint attention; plain SDPA + blend for SoftPAG heads).
* ``flex``: ``torch.compile``'d FlexAttention with a block mask (diagonal / text + diagonal for perturbed
  heads, built once outside the timing), the SoftPAG blend outside.
* ``attnctl``: :func:`attnctl.kernels.perturbed_attention`, one launch.

``tflops`` uses the nominal plain-attention count 4 * B * H * Sq * Sk * D for every method of a shape, so it
is an effective rate: a method that skips work shows a higher figure. Rows carry ``max_diff`` (max abs
difference from the attnctl output) for methods that compute the same function. Never asserts on time.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnctl.errors import ControlError

METHODS = ("sdpa-flash", "sdpa-cudnn", "sdpa+blend", "sdpa+separate", "flex", "attnctl")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class KernelShape:
    """One benchmark case. ``perturb``: "pag" (row 2, every head u = 1), "soft" (row 2, u = 0.5 on the first
    half of the heads: SoftPAG), "none" (u = 0 everywhere). ``text``: text span for mode "image"."""

    name: str
    B: int
    H: int
    Sq: int
    Sk: int
    D: int
    mode: str = "full"
    text: tuple[int, int] | None = None
    perturb: str = "pag"

    def u(self, device) -> torch.Tensor:
        u = torch.zeros(self.B, self.H, device=device)
        if self.perturb == "pag":
            u[-1] = 1.0
        elif self.perturb == "soft":
            u[-1, : max(1, self.H // 2)] = 0.5
        return u

    def flops(self) -> float:
        return 4.0 * self.B * self.H * self.Sq * self.Sk * self.D


def _shapes() -> dict[str, KernelShape]:
    sd3_text, flux_text = 333, 512
    cases = [
        KernelShape("sdxl-self-4096-pag", 3, 10, 4096, 4096, 64),
        KernelShape("sdxl-self-1024-pag", 3, 10, 1024, 1024, 64),
        KernelShape("sdxl-cross-4096x77", 3, 10, 4096, 77, 64, perturb="none"),
        KernelShape("sd3-joint-4429-pag", 3, 24, 4096 + sd3_text, 4096 + sd3_text, 64, "image", (4096, 4096 + sd3_text)),
        KernelShape("flux-joint-4608-pag", 3, 24, 4096 + flux_text, 4096 + flux_text, 128, "image", (0, flux_text)),
        # PAG's plain identity on the joint sequence (mode "full": every token's perturbed output is its V).
        KernelShape("sd3-joint-4429-pag-full", 3, 24, 4429, 4429, 64),
        KernelShape("flux-joint-4608-pag-full", 3, 24, 4608, 4608, 128),
        KernelShape("sdxl-self-4096-softpag", 3, 10, 4096, 4096, 64, perturb="soft"),
        KernelShape("sd3-joint-4429-softpag", 3, 24, 4429, 4429, 64, "image", (4096, 4429), "soft"),
        KernelShape("flux-joint-4608-softpag", 3, 24, 4608, 4608, 128, "image", (0, flux_text), "soft"),
        # Target baselines: [uncond, cond] alone, and unperturbed throughput at head_dim 128.
        KernelShape("sdxl-self-4096-uncond-cond", 2, 10, 4096, 4096, 64, perturb="none"),
        KernelShape("sd3-joint-4429-uncond-cond", 2, 24, 4429, 4429, 64, "image", (4096, 4429), "none"),
        KernelShape("flux-joint-4608-uncond-cond", 2, 24, 4608, 4608, 128, "image", (0, flux_text), "none"),
        KernelShape("sd3-joint-4429-uncond-cond-full", 2, 24, 4429, 4429, 64, perturb="none"),
        KernelShape("flux-joint-4608-uncond-cond-full", 2, 24, 4608, 4608, 128, perturb="none"),
        KernelShape("flux-joint-4608-plain", 3, 24, 4608, 4608, 128, "image", (0, flux_text), "none"),
    ]
    return {c.name: c for c in cases}


SHAPES = _shapes()
TINY = KernelShape("tiny-smoke", 3, 2, 256, 256, 64, "image", (200, 256), "soft")  # smoke runs only


# --- the methods -------------------------------------------------------------------------------------------


def _image_identity_bool(S: int, text: tuple[int, int], device) -> torch.Tensor:
    """(S, S) True where the mode-"image" perturbed map may look (dense: for the baselines only)."""
    idx = torch.arange(S, device=device)
    is_text = (idx >= text[0]) & (idx < text[1])
    return is_text[None, :] | is_text[:, None] | (idx[:, None] == idx[None, :])


def _perturbed_branch(shape: KernelShape, q, k, v, rows: torch.Tensor) -> torch.Tensor:
    """The perturbed map's output for batch ``rows``: V, or SDPA under the dense image-identity mask."""
    if shape.mode == "full":
        return v[rows]
    mask = _image_identity_bool(shape.Sq, shape.text, q.device)
    return F.scaled_dot_product_attention(q[rows], k[rows], v[rows], attn_mask=mask)


def _blend(plain, perturbed, u):
    """(1 - u) plain + u perturbed per head, exact at u = 0 and u = 1. u: (B', H)."""
    w = u[:, :, None, None].to(plain.dtype)
    return torch.where(w == 0, plain, torch.where(w == 1, perturbed, (1 - w) * plain + w * perturbed))


def _make_methods(shape: KernelShape, q, k, v, u) -> dict[str, Callable[[], torch.Tensor]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnctl.kernels.perturbed import perturbed_attention

    perturbed_rows = torch.nonzero((u != 0).any(dim=1)).flatten()
    unperturbed_rows = torch.nonzero((u == 0).all(dim=1)).flatten()
    methods: dict[str, Callable[[], torch.Tensor]] = {}

    def sdpa_with(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    methods["sdpa-flash"] = sdpa_with(SDPBackend.FLASH_ATTENTION)
    methods["sdpa-cudnn"] = sdpa_with(SDPBackend.CUDNN_ATTENTION)

    def sdpa_blend():
        out = F.scaled_dot_product_attention(q, k, v)
        if perturbed_rows.numel():
            out[perturbed_rows] = _blend(out[perturbed_rows], _perturbed_branch(shape, q, k, v, perturbed_rows),
                                         u[perturbed_rows])
        return out

    perturbed_list = perturbed_rows.tolist()
    soft_rows = {r for r in perturbed_list if bool((u[r] != 1).any())}

    def sdpa_separate():
        # diffusers: [uncond, cond] through SDPA, then each perturbed row on its own; a plain SDPA on it only
        # when some head is not fully perturbed (SoftPAG), then the blend.
        out = torch.empty_like(q)
        out[unperturbed_rows] = F.scaled_dot_product_attention(q[unperturbed_rows], k[unperturbed_rows],
                                                               v[unperturbed_rows])
        for r in perturbed_list:
            row = slice(r, r + 1)
            pert = _perturbed_branch(shape, q[row], k[row], v[row], slice(None))
            if r in soft_rows:
                pert = _blend(F.scaled_dot_product_attention(q[row], k[row], v[row]), pert, u[row])
            out[row] = pert
        return out

    methods["sdpa+blend"] = sdpa_blend
    methods["sdpa+separate"] = sdpa_separate
    flex = _make_flex(shape, q, k, v, u)
    if flex is not None:
        methods["flex"] = flex
    methods["attnctl"] = lambda: perturbed_attention(q, k, v, u, mode=shape.mode, text_range=shape.text)
    return methods


def _make_flex(shape: KernelShape, q, k, v, u):
    """Compiled FlexAttention: one call whose block mask gives perturbed heads their identity map (u == 1),
    plus a second call for SoftPAG heads (0 < u < 1), blended outside. Block masks are built once here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    # A fresh compile cache per shape: each shape's mask functions are new objects, and after 8 recompiles
    # dynamo silently falls back to eager FlexAttention (which materialises the score matrix).
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    B, H, S = shape.B, shape.H, shape.Sq
    full_id = u == 1  # (B, H) heads whose whole output is the perturbed map
    soft = (u > 0) & (u < 1)
    if shape.mode == "image":
        t0, t1 = shape.text

        def identity(q_idx, kv_idx):
            q_text = (q_idx >= t0) & (q_idx < t1)
            kv_text = (kv_idx >= t0) & (kv_idx < t1)
            return q_text | kv_text | (q_idx == kv_idx)
    else:
        def identity(q_idx, kv_idx):
            return q_idx == kv_idx

    def first_mask(b, h, q_idx, kv_idx):
        return ~full_id[b, h] | identity(q_idx, kv_idx)

    def second_mask(b, h, q_idx, kv_idx):
        # Only SoftPAG heads need it; elsewhere the diagonal keeps the work (and the output) trivial.
        return (soft[b, h] & identity(q_idx, kv_idx)) | (q_idx == kv_idx)

    if shape.Sq != shape.Sk:
        return lambda: compiled(q, k, v)
    mask1 = create_block_mask(first_mask, B, H, S, S, device=q.device)
    mask2 = create_block_mask(second_mask, B, H, S, S, device=q.device) if bool(soft.any()) else None

    def run():
        out = compiled(q, k, v, block_mask=mask1)
        if mask2 is not None:
            out = _blend(out, compiled(q, k, v, block_mask=mask2), torch.where(soft, u, torch.zeros_like(u)))
        return out
    return run


# --- timing ------------------------------------------------------------------------------------------------


def _time_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(median, min, max) milliseconds per call over ``repeats`` timed batches, after warm-up (compiles,
    autotuning, cuDNN plans). CUDA events around each batch; the batch size targets ~20 ms."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    per_call = max(start.elapsed_time(end), 1e-3)
    inner = max(1, min(200, int(20.0 / per_call)))
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples), min(samples), max(samples)


def run_kernel_bench(shapes=None, dtype: str = "bf16", repeats: int = 20, json_path: str | None = None,
                     methods=None, verbose: bool = True) -> list[dict]:
    """Time every method on every shape; return rows ``{"shape", "method", "ms", "tflops", "device", ...}``.

    shapes: names from ``SHAPES`` (default: all), ``"tiny-smoke"``, or ``KernelShape`` objects. dtype: "bf16",
    "fp16" or "fp32". repeats: timed batches per method (median reported, min/max kept). Prints a table and
    the performance target checks (``_targets``); writes ``{"device", "versions", "rows", "targets"}`` to
    ``json_path``.
    Raises ControlError without a CUDA GPU.
    """
    if not torch.cuda.is_available():
        raise ControlError(
            "the kernel benchmark needs a CUDA GPU (torch.cuda.is_available() is False here); "
            "run `attnctl bench kernel` on a machine with an NVIDIA GPU and a CUDA build of torch"
        )
    if dtype not in DTYPES:
        raise ControlError(f"bench kernel: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    wanted = list(SHAPES.values()) if shapes is None else [_resolve(s) for s in shapes]
    methods = tuple(methods or METHODS)
    device = torch.cuda.get_device_name()
    torch_dtype = DTYPES[dtype]
    rows: list[dict] = []
    for shape in wanted:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(shape.B, shape.H, shape.Sq, shape.D, device="cuda", generator=g, dtype=torch_dtype)
        k = torch.randn(shape.B, shape.H, shape.Sk, shape.D, device="cuda", generator=g, dtype=torch_dtype)
        v = torch.randn(shape.B, shape.H, shape.Sk, shape.D, device="cuda", generator=g, dtype=torch_dtype)
        u = shape.u("cuda")
        try:
            available = _make_methods(shape, q, k, v, u)
        except Exception as exc:  # a broken torch feature must not hide the other numbers
            available = {}
            rows.append(_row(shape, "setup", None, device, error=repr(exc)[:300]))
        reference = None
        for name in methods:
            fn = available.get(name)
            if fn is None:
                continue
            try:
                result = fn()
                ms, lo, hi = _time_ms(fn, repeats)
            except Exception as exc:
                rows.append(_row(shape, name, None, device, error=repr(exc)[:300]))
                continue
            row = _row(shape, name, ms, device, ms_min=lo, ms_max=hi)
            if name == "attnctl":
                reference = result
            rows.append(row)
            row["_out"] = result
        _fill_diffs(rows, shape, reference)
        del q, k, v
        torch.cuda.empty_cache()
    targets = _targets(rows)
    for r in rows:
        r.pop("_out", None)
    if verbose:
        _print_table(rows, targets)
    if json_path:
        import triton

        payload = {"device": device, "dtype": dtype,
                   "versions": {"torch": torch.__version__, "triton": triton.__version__,
                                "cuda": torch.version.cuda},
                   "rows": rows, "targets": targets}
        with open(json_path, "w") as fh:
            json.dump(payload, fh, indent=2)
    return rows


def _resolve(s) -> KernelShape:
    if isinstance(s, KernelShape):
        return s
    if s == TINY.name:
        return TINY
    if s not in SHAPES:
        from attnctl.errors import did_you_mean

        raise ControlError(f"bench kernel: unknown shape {s!r}{did_you_mean(s, SHAPES)}; known: {', '.join(SHAPES)}")
    return SHAPES[s]


def _row(shape: KernelShape, method: str, ms, device: str, **extra) -> dict:
    tflops = None if ms is None else shape.flops() / (ms * 1e-3) / 1e12
    return {"shape": shape.name, "method": method, "ms": ms, "tflops": tflops, "device": device, **extra}


# Methods that compute the perturbed function itself (the plain SDPA rows ignore the perturbation).
_SAME_FUNCTION = ("sdpa+blend", "sdpa+separate", "flex", "attnctl")


def _fill_diffs(rows: list[dict], shape: KernelShape, reference) -> None:
    for r in rows:
        out = r.get("_out")
        if r["shape"] != shape.name or out is None or reference is None:
            continue
        if r["method"] in _SAME_FUNCTION or shape.perturb == "none":
            r["max_diff"] = (out.float() - reference.float()).abs().max().item()


def _targets(rows: list[dict]) -> list[dict]:
    """The kernel's performance targets, computed from the rows that exist (missing rows give no check): perturbed
    rows cost at most 1.10x ``[uncond, cond]``, >= 350 TFLOP/s unperturbed at head dim 128 (stretch: 0.8x cuDNN
    SDPA), and SoftPAG faster than ``sdpa+blend`` and ``flex``."""
    ms = {(r["shape"], r["method"]): r["ms"] for r in rows if r.get("ms") is not None}
    tf = {(r["shape"], r["method"]): r["tflops"] for r in rows if r.get("tflops") is not None}
    out = []
    for family in ("sdxl-self-4096", "sd3-joint-4429", "flux-joint-4608"):
        for suffix, base, what in (("-pag", "-uncond-cond", "perturbed u=1"),
                                   ("-pag-full", "-uncond-cond-full", "perturbed u=1, mode full")):
            a, b = ms.get((f"{family}{suffix}", "attnctl")), ms.get((f"{family}{base}", "attnctl"))
            if a and b:
                out.append({"target": f"{family}: [uncond, cond, {what}] / [uncond, cond] <= 1.10",
                            "value": a / b, "met": a / b <= 1.10})
    t, c = tf.get(("flux-joint-4608-plain", "attnctl")), tf.get(("flux-joint-4608-plain", "sdpa-cudnn"))
    if t:
        out.append({"target": "hd128 ~4.6k tokens, unperturbed: >= 350 TFLOP/s", "value": t, "met": t >= 350})
    if t and c:
        out.append({"target": "stretch: >= 0.8x cuDNN SDPA", "value": t / c, "met": t / c >= 0.8})
    for family in ("sdxl-self-4096", "sd3-joint-4429", "flux-joint-4608"):
        mine = ms.get((f"{family}-softpag", "attnctl"))
        for rival in ("sdpa+blend", "flex"):
            theirs = ms.get((f"{family}-softpag", rival))
            if mine and theirs:
                out.append({"target": f"{family} SoftPAG: attnctl faster than {rival}", "value": theirs / mine,
                            "met": mine < theirs})
    return out


def _print_table(rows: list[dict], targets: list[dict]) -> None:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    print(f"{'shape':30} {'method':14} {'ms':>9} {'TFLOP/s':>8} {'max_diff':>9}")
    for r in rows:
        note = f"  {r['error']}" if r.get("error") else ""
        print(f"{r['shape']:30} {r['method']:14} {fmt(r['ms'], '9.3f')} {fmt(r['tflops'], '8.1f')} "
              f"{fmt(r.get('max_diff'), '9.2e')}{note}")
    if rows:
        print(f"device: {rows[0]['device']}")
    for t in targets:
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']:.3f}")
