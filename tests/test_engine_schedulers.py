"""Stochastic and multi-evaluation schedulers under ``apply``: the engine's ``scheduler.step`` wrapper must keep
the wrapped step's signature, because diffusers' pipelines pass ``eta`` and ``generator`` only to a step whose
``inspect.signature`` names them (``prepare_extra_step_kwargs``). Without it an ancestral sampler draws its noise
from the global RNG instead of the call's generator, and DDIM silently runs with eta = 0."""

import importlib.util
import inspect

import pytest
import torch

from attnctl.controls.perturb import Perturb
from attnctl.engine import apply
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

PROMPTS = ["a red circle", "a blue square on the left"]
SD15_MID = "mid_block.attentions.0.transformer_blocks.0.attn1"


def _scheduler(name: str, config):
    import diffusers

    if name == "DPMSolverSDEScheduler" and importlib.util.find_spec("torchsde") is None:
        pytest.skip("DPMSolverSDEScheduler needs torchsde, which is not installed")
    # DPM-Solver SDE draws its Brownian tree's seed from the global RNG unless the config fixes it; fixed here so
    # that two runs can be compared at all (the pipelines' generator does not reach it).
    overrides = {"noise_sampler_seed": 0} if name == "DPMSolverSDEScheduler" else {}
    return getattr(diffusers, name).from_config(config, **overrides)


SD15_CASES = [
    ("EulerAncestralDiscreteScheduler", {}),
    ("DDIMScheduler", {"eta": 1.0}),
    ("DPMSolverSDEScheduler", {}),
    ("HeunDiscreteScheduler", {}),
]


def test_the_wrapped_step_keeps_its_signature():
    pipe = tiny_pipeline("sd15")
    pipe.scheduler = _scheduler("EulerAncestralDiscreteScheduler", pipe.scheduler.config)
    stock = inspect.signature(pipe.scheduler.step)
    with apply(pipe):
        assert inspect.signature(pipe.scheduler.step) == stock
        assert {"generator", "return_dict"} <= set(inspect.signature(pipe.scheduler.step).parameters)


@pytest.mark.parametrize("name, extra", SD15_CASES, ids=[c[0] for c in SD15_CASES])
def test_sd15_no_control_equals_stock_bit_for_bit(name, extra):
    """Same seed, same scheduler: the final latents are identical (torch.equal), not merely close."""
    pipe = tiny_pipeline("sd15")
    pipe.scheduler = _scheduler(name, pipe.scheduler.config)
    stock = pipe(PROMPTS, **tiny_call_kwargs("sd15", **extra)).images
    with apply(pipe):
        ours = pipe(PROMPTS, **tiny_call_kwargs("sd15", **extra)).images
    assert torch.equal(ours, stock), f"max abs difference {(ours - stock).abs().max().item():.3g}"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_matching_stochastic_sampling_equals_stock_bit_for_bit(family):
    """SD3's and FLUX's pipelines never pass a generator to ``scheduler.step``: FlowMatchEulerDiscreteScheduler's
    stochastic sampling draws from the global RNG, seeded here before each call."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if "stochastic_sampling" not in inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters:
        pytest.skip("this diffusers' FlowMatchEulerDiscreteScheduler has no stochastic_sampling")
    pipe = tiny_pipeline(family)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    torch.manual_seed(1)
    stock = pipe(PROMPTS, **tiny_call_kwargs(family)).images
    with apply(pipe):
        torch.manual_seed(1)
        ours = pipe(PROMPTS, **tiny_call_kwargs(family)).images
    assert torch.equal(ours, stock), f"max abs difference {(ours - stock).abs().max().item():.3g}"


def test_pag_matches_diffusers_pag_pipeline_under_euler_ancestral():
    """Layer PAG against StableDiffusionPAGPipeline with an ancestral sampler: both draw the step noise from the
    call's generator, so the final latents agree within 1e-4 (float32) as with DDIM."""
    from diffusers import StableDiffusionPAGPipeline

    pipe = tiny_pipeline("sd15")
    pipe.scheduler = _scheduler("EulerAncestralDiscreteScheduler", pipe.scheduler.config)
    accepted = inspect.signature(StableDiffusionPAGPipeline.__init__).parameters
    pag = StableDiffusionPAGPipeline(**{k: v for k, v in pipe.components.items() if k in accepted},
                                     pag_applied_layers=[SD15_MID])
    pag.set_progress_bar_config(disable=True)
    reference = pag(PROMPTS[0], pag_scale=2.5, **tiny_call_kwargs("sd15")).images
    with apply(pipe, Perturb(scale=2.5, layers=[SD15_MID], mode="image")):
        ours = pipe(PROMPTS[0], **tiny_call_kwargs("sd15")).images
    plain = pipe(PROMPTS[0], **tiny_call_kwargs("sd15")).images
    assert (ours - reference).abs().max() <= 1e-4, f"max abs difference {(ours - reference).abs().max().item():.3g}"
    assert (plain - reference).abs().max() > 1e-2  # PAG did something the comparison can see
