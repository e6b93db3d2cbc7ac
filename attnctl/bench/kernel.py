"""``attnctl bench kernel``: the fused perturbed-attention kernel against SDPA and FlexAttention (CUDA only)."""

from __future__ import annotations

from ..errors import AttnctlError


def run(repeats: int = 5, families=None, quick: bool = False):
    try:
        from ..kernels.bench import run_kernel_bench
    except ImportError as exc:
        raise AttnctlError(f"the kernel benchmark is not available in this installation ({exc})") from None
    rows = run_kernel_bench(repeats=repeats, verbose=False)
    return rows, ["shape", "method", "ms", "tflops", "device"]
