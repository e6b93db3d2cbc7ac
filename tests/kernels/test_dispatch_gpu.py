"""On a CUDA GPU the perturb control's attention runs on the Triton kernel, and a whole generation through it
is as close to a float32 reference as the same generation forced onto PyTorch SDPA (``ATTNCTL_BACKEND=sdpa``)
in the same half-precision dtype (the kernel's accuracy rule, at most 2x SDPA's error against float64, applied
to a 10-step generation: rounding differences grow through the steps, so the bound is relative to SDPA's own
error). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.controls import Perturb
from attnctl.kernels import perturbed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("model, options", [
    ("shapes", {"layers": ["down_blocks.1", "up_blocks.1"], "u": 1.0, "scale": 2.0}),
    ("shapes", {"layers": ["down_blocks.1:heads=0,2", "up_blocks.1"], "u": 0.5, "scale": 2.0}),
    ("shapes-dit", {"layers": ["transformer_blocks.1", "transformer_blocks.2:heads=0"], "u": 1.0,
                    "scale": 2.0, "mode": "image"}),
])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_generation_on_kernel_matches_sdpa(model, options, dtype, monkeypatch):
    calls = []
    original = perturbed.run_request

    def counting(req):
        calls.append(req.u is not None)
        return original(req)

    monkeypatch.setattr(perturbed, "run_request", counting)

    def generate(pipe):
        with attnctl.apply(pipe, Perturb(options)):
            return pipe("a red circle and a blue square", num_inference_steps=10, guidance_scale=4.5, height=64,
                        width=64, generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images

    def rel(x, ref):
        return ((x.float() - ref).norm() / ref.norm()).item()

    monkeypatch.setenv("ATTNCTL_BACKEND", "sdpa")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # a float32 reference, not tf32 convolutions
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    reference = generate(attnctl.load(model, device="cuda", dtype="float32")).float()
    pipe = attnctl.load(model, device="cuda", dtype=dtype)
    sdpa = generate(pipe)
    assert not calls
    monkeypatch.delenv("ATTNCTL_BACKEND")
    fused = generate(pipe)
    assert calls, "the kernel never ran on CUDA"
    assert all(calls), "a call without a perturbation went to the kernel (SDPA is faster there)"
    assert torch.isfinite(fused).all()
    kernel_err, sdpa_err = rel(fused, reference), rel(sdpa, reference)
    print(f"{model} {dtype}: relative error vs float32, kernel {kernel_err:.3g}, SDPA {sdpa_err:.3g}")
    assert kernel_err <= 2 * sdpa_err + 1e-3, f"kernel {kernel_err:.3g} vs SDPA {sdpa_err:.3g} (float32 reference)"
