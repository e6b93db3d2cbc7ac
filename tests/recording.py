"""Test helper: record what a pipeline's denoiser returned and what its scheduler stepped with.

``Recorder(pipe)`` installs itself *under* the engine's wrappers when created before ``attnctl.apply`` (the
engine then wraps the recorder's forward), so ``calls`` holds every raw denoiser output, PAG's extra rows
included, and ``steps`` every noise prediction ``scheduler.step`` received: the guidance formula can then be
recomputed by hand from the model's own predictions. Remove it with ``close()`` (or use it as a context manager).
"""

from __future__ import annotations

import functools


class Recorder:
    """``calls``: each raw denoiser output (rows (B, ...)); ``skip_layers``: for each, whether the pipeline passed
    ``skip_layers`` (SD3's skip-layer-guidance call); ``steps``: each ``scheduler.step`` model output."""

    def __init__(self, pipe):
        denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        self.calls, self.skip_layers, self.steps = [], [], []
        forward, step = denoiser.forward, pipe.scheduler.step

        @functools.wraps(forward)  # the engine binds arguments by the forward's signature
        def record_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            self.calls.append((out[0] if isinstance(out, tuple) else out.sample).clone())
            self.skip_layers.append(kwargs.get("skip_layers") is not None)
            return out

        @functools.wraps(step)  # pipelines pass eta/generator only to a step whose signature names them
        def record_step(model_output, *args, **kwargs):
            self.steps.append(model_output.clone())
            return step(model_output, *args, **kwargs)

        denoiser.forward, pipe.scheduler.step = record_forward, record_step
        self._undo = lambda: (denoiser.__dict__.pop("forward"), pipe.scheduler.__dict__.pop("step"))

    def close(self):
        self._undo()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def assert_only_head_perturbed(record: dict, head: int) -> None:
    """One attention call recorded by a probe (``out`` (B, heads, ...), ``layout``): the perturbed rows equal the
    cond rows exactly at every head but ``head``, and differ from them at ``head``."""
    import torch

    out, layout = record["out"], record["layout"]
    cond, perturbed = out[layout.rows("cond")], out[layout.rows("perturb")]
    others = [h for h in range(out.shape[1]) if h != head]
    torch.testing.assert_close(perturbed[:, others], cond[:, others], atol=0, rtol=0)
    assert (perturbed[:, head] - cond[:, head]).abs().max() > 1e-4
