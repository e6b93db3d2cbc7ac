"""Ahead-of-time compilation for Hopper (sm_90) without a GPU: the kernel must get through Triton's code
generator, use the matrix instructions (wgmma) and pipelined 16-byte async copies. Slow (10-45 s per variant
on 2 CPU cores), so marked ``slow``; it needs triton's bundled CUDA tool-chain, not a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from attnctl.kernels import perturbed_kernel as pk

    fn = pk.perturbed_attention_fwd
    mode, head_dim, block_m, block_n, warps = (int(x) for x in sys.argv[1:])
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, MODE_IMAGE=mode, HAS_BIAS=0, HAS_REGION=0, IS_FP32=0,
                      BLOCK_M=block_m, BLOCK_N=block_n)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "U":
            signature[name] = "*fp32"
        elif name in ("Q", "K", "V", "Out", "Bias", "QReg", "KReg"):
            signature[name] = "*bf16"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    # What the JIT infers at launch for real tensors: 16-byte aligned pointers and row strides.
    aligned = [i for i, n in enumerate(fn.arg_names) if signature[n].startswith("*")
               or n in ("stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn",
                        "stride_vb", "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_om")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=3))
    ptx = kernel.asm["ptx"]
    print("wgmma", ptx.count("wgmma.mma_async"), "cp.async", ptx.count("cp.async.cg"))
''')


@pytest.mark.parametrize("mode, head_dim, block_m, block_n, warps", [(0, 64, 128, 64, 4), (1, 128, 128, 64, 8)])
def test_compiles_for_hopper_with_wgmma_and_async_copies(mode, head_dim, block_m, block_n, warps):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(mode), str(head_dim), str(block_m), str(block_n),
                           str(warps)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    words = proc.stdout.split()
    counts = dict(zip(words[::2], map(int, words[1::2])))
    assert counts["wgmma"] > 0, "tl.dot did not lower to Hopper's wgmma"
    assert counts["cp.async"] > 0, "key/value loads are not pipelined 16-byte async copies"
