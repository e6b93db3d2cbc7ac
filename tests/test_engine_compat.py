"""attnctl alongside what users already put on a pipeline: peft LoRA layers on the denoiser and accelerate's
model CPU offload hooks, each added before or inside an ``apply`` block.

Real components only: LoRA weights made with peft (random, nonzero), saved and loaded through diffusers'
``save_lora_weights`` / ``load_lora_weights``; offload through ``enable_model_cpu_offload(device="cpu")``
(accelerate's ``cpu_offload_with_hook``, the same hooks as on CUDA, with the CPU as the execution device).
Tolerances: with no control the engine only passes calls through, so outputs are compared bit for bit; with a
control, two runs of the same control are compared bit for bit, and a control against no control by a margin.
"""

import pytest
import torch

pytest.importorskip("peft")

from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from attnctl.controls.maps import Maps  # noqa: E402
from attnctl.controls.perturb import Perturb  # noqa: E402
from attnctl.engine import apply  # noqa: E402
from attnctl.testing import tiny_call_kwargs, tiny_pipeline  # noqa: E402

PROMPT = "a red circle"
# (denoiser attribute, the save_lora_weights argument that holds its layers)
LORA_TARGETS = {"sd15": ("unet", "unet_lora_layers"), "flux": ("transformer", "transformer_lora_layers")}


@pytest.fixture(scope="module", params=sorted(LORA_TARGETS))
def lora(request, tmp_path_factory):
    """(family, folder) of a LoRA on every attention projection of the tiny denoiser, random nonzero weights."""
    family = request.param
    attr, argument = LORA_TARGETS[family]
    pipe = tiny_pipeline(family)
    denoiser = getattr(pipe, attr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    folder = tmp_path_factory.mktemp(f"lora-{family}")
    type(pipe).save_lora_weights(folder, **{argument: get_peft_model_state_dict(denoiser)})
    return family, folder


def _run(pipe, family):
    return pipe(PROMPT, **tiny_call_kwargs(family)).images


def _pag(family):
    layers = ["mid_block"] if family == "sd15" else ["transformer_blocks.0"]
    return Perturb(scale=3.0, layers=layers)


def test_lora_loaded_before_or_inside_apply(lora):
    family, folder = lora
    pipe = tiny_pipeline(family)
    plain = _run(pipe, family)
    with apply(pipe, _pag(family)):
        pag = _run(pipe, family)
    pipe.load_lora_weights(folder, adapter_name="lora")
    with_lora = _run(pipe, family)
    assert (with_lora - plain).abs().max() > 1e-2  # the LoRA changes the output

    with apply(pipe):  # loaded before: no control, every call passes through
        assert torch.equal(_run(pipe, family), with_lora)
    with apply(pipe, _pag(family)):
        pag_lora = _run(pipe, family)
    assert (pag_lora - with_lora).abs().max() > 1e-2  # the control acts
    assert (pag_lora - pag).abs().max() > 1e-2  # and the LoRA still does under it

    pipe.unload_lora_weights()
    assert torch.equal(_run(pipe, family), plain)
    with apply(pipe) as session:  # loaded inside the block: peft swaps the projections under attnctl's hooks
        pipe.load_lora_weights(folder, adapter_name="lora")
        assert torch.equal(_run(pipe, family), with_lora)
        assert session.attention_calls > 0
    with apply(pipe, _pag(family)):
        assert torch.equal(_run(pipe, family), pag_lora)
    assert torch.equal(_run(pipe, family), with_lora)  # exit left the LoRA in place

    pipe.unload_lora_weights()
    with apply(pipe, _pag(family)):
        pipe.load_lora_weights(folder, adapter_name="lora")
        assert torch.equal(_run(pipe, family), pag_lora)


def test_lora_with_maps_captures_and_keeps_the_lora(lora):
    """A control on the cross-attention (maps) sees the LoRA's projections: the maps differ with the LoRA."""
    family, folder = lora
    if family != "sd15":
        pytest.skip("one family is enough for maps")
    pipe = tiny_pipeline(family)
    maps = {}
    for name in ("plain", "lora"):
        if name == "lora":
            pipe.load_lora_weights(folder, adapter_name="lora")
        control = Maps(words=["circle"], layers=["kind=cross"])
        with apply(pipe, control):
            out = _run(pipe, family)
        maps[name] = control.maps["circle"]
        if name == "lora":
            assert torch.equal(out, _run(pipe, family))  # maps only read attention: output unchanged
    assert (maps["lora"] - maps["plain"]).abs().max() > 1e-3


# -- model CPU offload (accelerate hooks) --------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_model_cpu_offload_before_or_inside_apply(family):
    pipe = tiny_pipeline(family)
    plain = _run(pipe, family)
    with apply(pipe, _pag(family)):
        pag = _run(pipe, family)
    assert (pag - plain).abs().max() > 1e-2

    offloaded = tiny_pipeline(family)
    offloaded.enable_model_cpu_offload(device="cpu")
    denoiser = offloaded.unet if family == "sd15" else offloaded.transformer
    assert hasattr(denoiser, "_hf_hook")
    assert torch.equal(_run(offloaded, family), plain)
    with apply(offloaded):  # enabled before
        assert torch.equal(_run(offloaded, family), plain)
    with apply(offloaded, _pag(family)):
        assert torch.equal(_run(offloaded, family), pag)
    assert torch.equal(_run(offloaded, family), plain)
    with apply(offloaded, _pag(family)):  # the end of each call re-adds the offload hooks: still controlled
        for _ in range(2):
            assert torch.equal(_run(offloaded, family), pag)
    # On exit the offload hook stays, with the denoiser's own forward under it (not attnctl's).
    assert getattr(denoiser._old_forward, "__func__", None) is type(denoiser).forward
    assert torch.equal(_run(offloaded, family), plain)

    inside = tiny_pipeline(family)
    denoiser = inside.unet if family == "sd15" else inside.transformer
    with apply(inside, _pag(family)):  # enabled inside the block: accelerate wraps attnctl's forward
        inside.enable_model_cpu_offload(device="cpu")
        for _ in range(2):
            assert torch.equal(_run(inside, family), pag)
    # On exit the offload hook stays, with the denoiser's own forward under it (not attnctl's).
    assert hasattr(denoiser, "_hf_hook")
    assert getattr(denoiser._old_forward, "__func__", None) is type(denoiser).forward
    assert torch.equal(_run(inside, family), plain)
    inside.remove_all_hooks()
    assert "forward" in denoiser.__dict__ and not hasattr(denoiser, "_hf_hook")
    assert torch.equal(_run(inside, family), plain)
    with apply(inside, _pag(family)):
        assert torch.equal(_run(inside, family), pag)


# -- (7) a modular SDXL pipeline: the rows' roles come from its guider ---------------------------------------
def modular_sdxl(guider):
    """diffusers' modular SDXL pipeline (StableDiffusionXLAutoBlocks) on the tiny SDXL components."""
    from diffusers.modular_pipelines.stable_diffusion_xl import StableDiffusionXLAutoBlocks

    base = tiny_pipeline("sdxl")
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(**{k: v for k, v in base.components.items() if v is not None}, guider=guider)
    return pipe


def _modular_run(pipe, steps=3):
    return pipe(prompt=PROMPT, num_inference_steps=steps, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output="latents")


class Roles(Maps):
    """Maps' sites (one cross-attention layer), recording each denoiser call's layout (kind, branches) instead of
    maps: it reads no prompt text, so it runs on a modular pipeline (Maps itself is an error there)."""

    needs_prompt = False

    def __init__(self):
        super().__init__(words=["circle"], layers=["mid_block.attentions.0.transformer_blocks.0.attn2"])
        self.seen = []

    def on_attention(self, call):
        self.seen.append((call.layout.kind, call.layout.branches))


def test_modular_sdxl_rows_roles_come_from_the_cfg_guider():
    from diffusers.guiders import ClassifierFreeGuidance

    from recording import Recorder

    pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    stock = _modular_run(pipe)
    with apply(pipe):
        assert torch.equal(_modular_run(pipe), stock)

    roles = Roles()
    with apply(pipe, [roles]):
        _modular_run(pipe)
    # one call per guider prediction, pred_cond then pred_uncond, at each of the 3 steps
    assert roles.seen == [("cond_batch", ("cond",)), ("uncond_call", ("uncond",))] * 3

    recorder = Recorder(pipe)
    try:
        with apply(pipe, Perturb(scale=2.0, layers=["mid_block"])):
            pag = _modular_run(pipe)
    finally:
        recorder.close()
    assert (pag - stock).abs().max() > 1e-3
    # the perturbed row joins the guider's cond call only; the guider's CFG then gains exactly s (cond - perturbed)
    assert [c.shape[0] for c in recorder.calls] == [2, 1] * 3
    assert len(recorder.steps) == 3
    for i, eps in enumerate(recorder.steps):
        cond, perturbed = recorder.calls[2 * i][:1], recorder.calls[2 * i][1:]
        uncond = recorder.calls[2 * i + 1]
        expected = uncond + 5.0 * (cond - uncond) + 2.0 * (cond - perturbed)
        torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-5)


def test_modular_sdxl_guider_prediction_of_no_known_role_is_an_error():
    """PAG's guider adds a ``pred_cond_skip`` call: attnctl does not guess its rows' role."""
    from diffusers.guiders import PerturbedAttentionGuidance

    from attnctl.errors import LayoutError

    from diffusers.hooks import LayerSkipConfig

    skip = LayerSkipConfig(indices=[0], fqn="mid_block.attentions.0.transformer_blocks", skip_attention=False,
                           skip_attention_scores=True, skip_ff=False)
    pipe = modular_sdxl(PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=2.0,
                                                   perturbed_guidance_config=skip, perturbed_guidance_start=0.0,
                                                   perturbed_guidance_stop=1.0))
    with pytest.raises(LayoutError, match=r"PerturbedAttentionGuidance guider for prediction 'pred_cond_skip'"):
        with apply(pipe):
            _modular_run(pipe)


def _rescaled(noise_cfg, cond, rescale):
    """diffusers' ``rescale_noise_cfg`` in float64."""
    dims = list(range(1, noise_cfg.ndim))
    std_cond, std_cfg = cond.std(dim=dims, keepdim=True), noise_cfg.std(dim=dims, keepdim=True)
    return rescale * noise_cfg * (std_cond / std_cfg) + (1 - rescale) * noise_cfg


@pytest.mark.parametrize("cfg", [1.0, 1.0001, 5.0])
def test_modular_sdxl_cfg_guider_rescales_by_the_models_own_cond_prediction(cfg):
    """A ``ClassifierFreeGuidance(guidance_rescale=0.7)`` guider rescales its prediction by the std of the cond
    rows it got. PAG's delta is folded into the cond (and uncond) rows, so while the guider runs attnctl gives
    its module's rescale_noise_cfg the cond rows as the model predicted them, as diffusers' PAG guider computes:
    eps = rescale(uncond + w (cond - uncond) + s (cond - perturbed), cond) (without CFG: cond + s (...)),
    recomputed here in float64 from the raw rows. The guider's module holds its own function again after."""
    import sys

    from diffusers.guiders import ClassifierFreeGuidance

    from recording import Recorder

    guider = ClassifierFreeGuidance(guidance_scale=cfg, guidance_rescale=0.7)
    module = sys.modules[type(guider).__module__]
    own = module.rescale_noise_cfg
    pipe = modular_sdxl(guider)
    recorder = Recorder(pipe)
    try:
        with apply(pipe, Perturb(scale=2.0, layers=["mid_block"])):
            _modular_run(pipe)
            assert module.rescale_noise_cfg is own
    finally:
        recorder.close()
    assert module.rescale_noise_cfg is own and "forward" not in guider.__dict__
    per_step = 1 if cfg == 1.0 else 2
    assert [c.shape[0] for c in recorder.calls] == ([2, 1] if per_step == 2 else [2]) * 3
    worst, shifted_std = 0.0, 0.0
    for i, eps in enumerate(recorder.steps):
        call = recorder.calls[per_step * i].double()
        cond, perturbed = call[:1], call[1:]
        delta = 2.0 * (cond - perturbed)
        guided = cond + delta
        if per_step == 2:
            uncond = recorder.calls[per_step * i + 1].double()
            guided = uncond + cfg * (cond - uncond) + delta
        worst = max(worst, (eps.double() - _rescaled(guided, cond, 0.7)).abs().max().item())
        shifted_std = max(shifted_std, (eps.double() - _rescaled(guided, cond + delta, 0.7)).abs().max().item())
    assert worst <= 1e-5, f"max abs difference {worst:.3g}"
    assert shifted_std > 1e-3  # the guider's own rescale (std of the shifted cond rows) is not it


@pytest.mark.parametrize("kind", ["maps", "regions", "excite"])
def test_modular_sdxl_controls_that_need_the_prompt_text_are_an_error_at_the_first_denoiser_call(kind):
    """A modular pipeline has no encode_prompt: attnctl never sees a call start or its prompts, so a control that
    reads the prompt text stops at the first denoiser call, before it runs, with an error naming it; the pipeline
    is restored and prompt-free controls (perturb) run."""
    from diffusers.guiders import ClassifierFreeGuidance

    from attnctl.errors import ControlError
    from recording import Recorder
    from test_engine import _prompt_controls

    pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    assert not hasattr(pipe, "encode_prompt")
    stock = _modular_run(pipe)
    recorder = Recorder(pipe)
    try:
        with pytest.raises(ControlError, match=rf"control '{kind}' needs the prompt text .*"
                                               r"StableDiffusionXLModularPipeline has no encode_prompt"):
            with apply(pipe, [Perturb(scale=2.0, layers=["mid_block"]), _prompt_controls(kind)]):
                _modular_run(pipe)
    finally:
        recorder.close()
    assert recorder.calls == []  # stopped before the denoiser ran
    assert torch.equal(_modular_run(pipe), stock)
    with apply(pipe, Perturb(scale=2.0, layers=["mid_block"])):
        pag = _modular_run(pipe)
    assert (pag - stock).abs().max() > 1e-3
