"""Z-Image (``tiny:zimage``): the adapter, stock equality, the [cond; uncond] CFG batch, every control, bad input.

Real components only: diffusers' ``ZImagePipeline`` with tiny random weights (its ``ZSingleStreamAttnProcessor``,
its list-taking transformer, its CFG in one batch with the cond rows first, its caption padding and key masks).
"""

import functools

import pytest
import torch

import attnctl
from attnctl.controls.base import Control
from attnctl.controls.excite import Excite
from attnctl.controls.maps import Maps
from attnctl.controls.perturb import Perturb
from attnctl.controls.regions import Regions
from attnctl.engine import apply
from attnctl.errors import AttnctlError, ControlError, LayoutError, SelectorError
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

PROMPT = "a red circle and a blue square"
# Captions of different padded lengths (32 and 64 tokens with the chat turn): the main layers' rows are padded to
# the longest and the processor passes a boolean key mask.
# ZImagePipeline renders the chat template into the prompt list it is given (in place): pass a fresh list per call.
PROMPTS = (PROMPT, "a cat on the left of a tree" + " and a small red ball in the middle" * 3)


def prompts():
    return list(PROMPTS)
MAIN = "layers.1.attention"
REFINER = "noise_refiner.0.attention"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("zimage")


def kwargs(**overrides):
    return tiny_call_kwargs("zimage", **overrides)


class Probe(Control):
    """Records each call at the named sites (default: all): q, k, v, bias, spans, layout and the output."""

    name = "probe"

    def __init__(self, sites=None):
        super().__init__()
        self.sites, self.calls = sites, []

    def bind(self, session):
        return {s.name: None for s in session.sites if self.sites is None or s.name in self.sites}

    def on_attention(self, call):
        record = {"site": call.site.name, "q": call.q, "k": call.k, "v": call.v, "bias": call.bias,
                  "text": call.text, "image": call.image, "layout": call.layout, "grid": call.grid}
        self.calls.append(record)

        def keep(out):
            record["out"] = out
            return out

        call.then(keep)


def probabilities(record, rows):
    """float64 softmax(q k^T / sqrt(d) + bias) of ``rows`` of a recorded call, (R, H, S, S)."""
    q, k = record["q"][rows].double(), record["k"][rows].double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    bias = record["bias"]
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=torch.float64).masked_fill(~bias, float("-inf"))
        bias = bias.double()
        scores = scores + (bias[rows] if bias.shape[0] > 1 else bias)
    return torch.softmax(scores, dim=-1)


# -- the adapter ---------------------------------------------------------------------------------------------
def test_sites_kinds_and_token_spans(pipe):
    """The image refiner is self-attention, the main layers single-stream over [image; text]; the caption
    refiner (text only) is no site. Image first: its 8x8 tokens, padded to 64 (a multiple of 32), then the text;
    at 32x40 px the 8x10 image tokens are padded to 96 and the text starts there."""
    session = attnctl.engine.Session(pipe)
    assert session.family == "zimage"
    assert [(s.name, s.kind, s.heads, s.head_dim) for s in session.sites] == [
        ("noise_refiner.0.attention", "self", 4, 8), ("layers.0.attention", "single", 4, 8),
        ("layers.1.attention", "single", 4, 8)]
    for width, grid, start in ((32, (8, 8), 64), (40, (8, 10), 96)):
        probe = Probe([REFINER, MAIN])
        with apply(pipe, probe) as session:
            pipe(prompts(), **kwargs(steps=1, width=width))
            at = session.text_positions(0, "circle")
        refiner, main = probe.calls
        assert refiner["text"] is None and refiner["image"] == slice(0, grid[0] * grid[1])
        assert refiner["q"].shape[2] == start and tuple(refiner["grid"]) == grid
        assert main["image"] == slice(0, grid[0] * grid[1]) and main["text"] == slice(start, main["q"].shape[2])
        assert tuple(main["grid"]) == grid
        # CFG in one batch, cond rows first: [cond x 2; uncond x 2]
        assert main["layout"].branches == ("cond", "cond", "uncond", "uncond")
        assert main["layout"].samples == (0, 1, 0, 1)
        # the captions differ in length: the shorter rows' padding is masked by the processor's key mask
        assert main["bias"].dtype == torch.bool
        # the prompt's tokens follow the chat turn's prefix "<|im_start|>user\n"
        rendered = pipe.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                      add_generation_prompt=True)
        tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(rendered).input_ids)
        assert at == [tokens.index("Ġcircle")]


def test_no_control_equals_stock_bit_for_bit_and_hooks_within_1e5(pipe):
    """Under apply with no control the latents equal stock diffusers bit for bit (torch.equal): CFG with two
    prompts of different lengths, Z-Image-Turbo's call without CFG (guidance_scale=0) and CFG truncated at late
    steps; with a control that sees every attention call and changes nothing they are within 1e-5."""
    for call in (dict(), dict(guidance_scale=0.0), dict(cfg_truncation=0.3, steps=3)):
        steps = call.pop("steps", 2)
        stock = pipe(prompts(), **kwargs(steps=steps, **call)).images
        with apply(pipe, []):
            assert torch.equal(pipe(prompts(), **kwargs(steps=steps, **call)).images, stock)
        probe = Probe()
        with apply(pipe, probe):
            seen = pipe(prompts(), **kwargs(steps=steps, **call)).images
        assert (seen - stock).abs().max() <= 1e-5
        assert len(probe.calls) == 3 * steps  # every site, every step: one batched call per step
        layouts = [r["layout"].branches for r in probe.calls]
        if call.get("guidance_scale") == 0.0:
            assert set(layouts) == {("cond", "cond")}
        elif "cfg_truncation" in call:  # the last step, (1000 - t) / 1000 = 0.4 > 0.3, has the cond rows only
            assert set(layouts) == {("cond", "cond", "uncond", "uncond"), ("cond", "cond")}
        else:
            assert set(layouts) == {("cond", "cond", "uncond", "uncond")}
