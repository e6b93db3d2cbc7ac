"""Controls build their tensors on the device and in the dtype of the attention inputs.

This machine may have no GPU, so the device check runs each control's attention hooks a second time on
meta-device copies of every call's q/k/v (and a boolean mask, as a pipeline's attention mask would be), under a
torch-function mode that raises when one op mixes tensors of two devices: a tensor a control builds on the CPU
then meets a meta tensor, as it would meet a CUDA tensor on a GPU. The dtype check runs real pipelines in
float64, where a float32 tensor built inside a control changes what a matmul gets."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from attnctl.controls.base import Control
from attnctl.controls.edit import Edit
from attnctl.controls.perturb import Perturb
from attnctl.controls.regions import Regions
from attnctl.engine import AttentionCall, apply
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

PAIR = ["a red circle and a blue square", "a red circle and a green square"]  # edits: one word differs
TWO = ["a red circle and a blue square", "a blue square and a red circle"]  # regions: both phrases in both
WINDOW = {"start": 0.0, "stop": 1.0}
REGIONS = [{"phrase": "red circle", "box": [0.0, 0.0, 0.5, 1.0]},
           {"phrase": "blue square", "box": [0.5, 0.0, 1.0, 1.0]}]

# Ops that may take a CPU index into a tensor of another device (as CUDA allows), or move tensors between devices.
_INDEXING = {"__getitem__", "__setitem__", "to", "cpu", "cuda", "copy_", "new_tensor"}


def _devices(value, found):
    if isinstance(value, torch.Tensor):
        if value.ndim > 0:  # a 0-dim CPU tensor is a scalar every device accepts
            found.add(value.device)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _devices(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _devices(v, found)
    return found


class OneDevice(TorchFunctionMode):
    """Raises when a torch op gets non-scalar tensors of more than one device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in _INDEXING:
            found = _devices(list(args) + list(kwargs.values()), set())
            if len(found) > 1:
                raise AssertionError(f"{getattr(func, '__name__', func)} mixes devices {sorted(map(str, found))}")
        return func(*args, **kwargs)


class OnMeta(Control):
    """Runs ``inner``'s attention hooks again on meta copies of each call and records the outputs."""

    name = "on-meta"

    def __init__(self, inner: Control, bool_mask: bool = False):
        super().__init__()
        self.inner, self.bool_mask, self.outputs = inner, bool_mask, []

    def bind(self, session):
        return self.inner.bind(session)

    def on_call_start(self, session):
        self.inner.on_call_start(session)

    def on_call_end(self, session):
        return self.inner.on_call_end(session)

    def on_attention(self, call):
        meta = AttentionCall(call.session, call.site, *(x.detach().to("meta") for x in (call.q, call.k, call.v)),
                             call.text, call.image, None if call.bias is None else call.bias.to("meta"))
        if self.bool_mask and meta.bias is None:  # a pipeline's boolean attention mask: every key visible
            meta.bias = torch.ones(call.k.shape[2], dtype=torch.bool, device="meta")
        meta.heads = call.heads
        with OneDevice():
            self.inner.on_attention(meta)
            if meta.u is not None:  # attend() reads whether any u > 0 (a host sync meta cannot answer)
                self.outputs.append((meta.u.device, meta.u.dtype, call.q.dtype))
                return
            out = meta.compute()
        self.outputs.append((out.device, out.dtype, call.q.dtype))


CASES = {
    "edit-reweight": ("sd15", PAIR, lambda: Edit(kind="reweight", reweight={"green": 2.0}, cross={"window": WINDOW})),
    "edit-refine": ("sd15", PAIR, lambda: Edit(kind="refine", cross={"window": WINDOW})),
    "edit-joint-blocks": ("sd3", PAIR, lambda: Edit(joint={"window": WINDOW, "inject": [],
                                                     "blocks": ["image->text", "text->image"]},
                                                           cross={"window": WINDOW})),
    "regions-hard": ("sd15", TWO, lambda: Regions(regions=REGIONS, mode="hard", window=WINDOW)),
    "regions-soft-sd3": ("sd3", TWO, lambda: Regions(regions=REGIONS, mode="soft", self_weight=0.3, window=WINDOW)),
    "perturb": ("sdxl", TWO, lambda: Perturb(scale=2.0)),
}


@pytest.mark.parametrize("bool_mask", [False, True], ids=["no-mask", "bool-mask"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_hooks_build_tensors_on_the_inputs_device(case, bool_mask):
    family, prompts, make = CASES[case]
    pipe = tiny_pipeline(family)
    probe = OnMeta(make(), bool_mask=bool_mask)
    with apply(pipe, [probe]):
        pipe(prompts, **tiny_call_kwargs(family, steps=1))
    assert probe.outputs
    assert all(device.type == "meta" and dtype == q_dtype for device, dtype, q_dtype in probe.outputs)


@pytest.mark.parametrize("case", list(CASES))
def test_float64_pipelines_run_every_control_in_float64(case):
    family, prompts, make = CASES[case]
    pipe = tiny_pipeline(family, dtype=torch.float64)
    probe = OnMeta(make())
    with apply(pipe, [make(), probe]):
        out = pipe(prompts, **tiny_call_kwargs(family, steps=2)).images
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert probe.outputs and all(dtype == torch.float64 for _, dtype, _ in probe.outputs)
