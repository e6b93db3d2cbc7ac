"""CPU dry run of what a GPU session runs (``kernels/gpu_session.sh``), so the one device call does not fail on a
typo: the full-size benchmark's every (variant, setting) at tiny size on the CPU in float32, the half-precision
control checks' code path (``tests/test_gpu_controls.measure``) in bfloat16 on the CPU at 2 steps, and the
script's shell syntax. Nothing here is a measurement: no bound, no time is asserted."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attnctl.bench import BENCHES
from attnctl.bench.fullsize import VARIANTS, flux2_available, print_report, run_fullsize

ROOT = Path(__file__).resolve().parent.parent


def test_fullsize_benchmark_runs_every_setting_at_tiny_size(tmp_path, capsys):
    path = tmp_path / "fullsize.json"
    report = run_fullsize(size="tiny", device="cpu", repeats=1, warmup=0, json_path=str(path), verbose=False)
    written = json.loads(path.read_text())
    assert written["rows"] == json.loads(json.dumps(report["rows"]))
    for key in ("device", "date", "command", "versions", "dtype", "targets"):
        assert written[key], key
    assert written["size"] == "tiny" and written["dtype"] == "float32"
    expected = {(v.name, s) for v in VARIANTS.values() for s in v.settings if v.family != "flux2" or flux2_available()}
    got = {(r["variant"], r["setting"]) for r in report["rows"]}
    assert got == expected
    errors = [f"{r['variant']}/{r['setting']}: {r['error']}" for r in report["rows"] if "error" in r]
    assert not errors, "\n".join(errors)
    for row in report["rows"]:
        assert row["ms"] > 0 and row["denoiser_calls"] >= 1
    calls = {(r["variant"], r["setting"]): r["denoiser_calls"] for r in report["rows"]}
    assert calls[("flux", "cfg")] == 2 and calls[("flux", "baseline")] == 1  # FLUX true CFG: two calls
    assert calls[("sd15", "diffusers-excite")] == 2  # its gradient forward, then the CFG forward
    assert all(t["status"] == "n/a (tiny)" for t in report["targets"])
    print_report(report)
    out = capsys.readouterr().out
    assert "cfg+softpag" in out and "diffusers-excite" in out and "target" in out


def test_fullsize_is_a_registered_benchmark_and_full_size_needs_cuda():
    from attnctl.errors import AttnctlError

    assert BENCHES["fullsize"] == "attnctl.bench.fullsize:run"
    if not torch.cuda.is_available():
        with pytest.raises(AttnctlError, match="needs a CUDA GPU"):
            run_fullsize(size="full", device="cpu")
    with pytest.raises(AttnctlError, match="unknown variant 'sdxll'"):
        run_fullsize(size="tiny", device="cpu", variants=["sdxll"])


@pytest.mark.parametrize("model, controls", [
    ("tiny:sd15", ("perturb-layer", "perturb-heads", "softpag", "excite", "excite-refine", "regions-hard",
                   "regions-soft", "maps", "interpolate", "edit")),
    ("tiny:flux", ("softpag", "regions-soft")),
    ("shapes-dit", ("perturb-heads",)),
])
def test_gpu_control_checks_run_on_cpu(model, controls):
    import test_gpu_controls as gpu

    assert set(controls) <= set(gpu.CONTROLS) and model in gpu.MODELS
    for control in controls:
        result = gpu.measure(model, control, "bfloat16", device="cpu", steps=2)
        assert math.isfinite(result["plain"])
        assert result["outputs"] and "latents" in result["outputs"]
        for key, (error, bound) in result["outputs"].items():
            assert math.isfinite(error) and bound > 0, (control, key)
        if control == "maps":
            assert any(k.startswith("maps/") for k in result["outputs"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_session_script_parses():
    done = subprocess.run(["bash", "-n", str(ROOT / "kernels" / "gpu_session.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
