"""Batch layouts (attnctl.layouts): the roles of a denoiser call's rows come from what the call is.

Real tiny pipelines only; a ``Recorder`` (``tests/recording.py``) sits under the engine's wrapper and keeps
every raw denoiser output (with whether the pipeline passed ``skip_layers``) and every scheduler input, so the
guidance formula is recomputed by hand from the model's own predictions.
"""

import pytest
import torch

from attnctl.controls.base import Control
from attnctl.controls.perturb import Perturb
from attnctl.engine import apply
from attnctl.errors import LayoutError
from attnctl.testing import tiny_call_kwargs, tiny_pipeline
from recording import Recorder

PROMPT = "a red circle"


class Layouts(Control):
    """Hooks every attention site and records the layout (kind, branches) of each denoiser call it sees."""

    name = "layouts"
    families = ("sd15", "sdxl", "sd3", "flux")

    def __init__(self):
        super().__init__()
        self.seen = []

    def bind(self, session):
        return {s.name: None for s in session.sites}

    def on_attention(self, call):
        entry = (call.layout.kind, call.layout.branches)
        if not self.seen or self.seen[-1] != entry:
            self.seen.append(entry)


# -- (a) SD3 skip-layer guidance + PAG: the hand-derived formula -------------------------------------------
@pytest.mark.parametrize("images", [1, 2])
def test_sd3_skip_layer_guidance_with_pag_is_the_hand_formula(images):
    """StableDiffusion3Pipeline with ``skip_guidance_layers`` (SD3.5-Medium's recommended SLG, scale 2.8) makes,
    at each SLG step, a CFG call [uncond; cond] and then a call on the cond latents alone with ``skip_layers=``.
    From diffusers' code, with PAG (scale s) on the CFG call:

        eps = uncond + w (cond - uncond) + s (cond - perturbed) + slg (cond - cond_skip)

    with every term the model's own prediction (cond_skip from the extra call, which gets no perturbed rows).

    Before the layouts (commit 7d6b0cc), measured on this test's setup (w = 5, s = 2, slg = 2.8, 4 steps, SLG
    at steps 1-3): the skip call was laid out by guess (``do_classifier_free_guidance`` and an even row count),
    so it got its own perturbed row and its own fold; and the main call's cond rows took +delta (the engine
    checked ``pipe._skip_guidance_layers``, which diffusers never sets). The result was exactly (to 6e-7)
    eps_hand + 2.8 delta_main - 2.8 delta_skip: with 1 image a max error of 0.045 / 0.058 / 0.047 per step
    against |delta| = 0.042 / 0.032 / 0.038; with 2 images the skip call's first sample was read as uncond and
    both samples took sample 1's skip delta (error 0.107 / 0.113 / 0.099). Now the skip call is the
    ``skip_layers`` layout: no extra rows, and it takes the delta the cond rows took, so it cancels in
    (cond - cond_skip).
    """
    w, s, slg = 5.0, 2.0, 2.8
    pipe = tiny_pipeline("sd3")
    recorder = Recorder(pipe)
    kwargs = tiny_call_kwargs("sd3", steps=4, guidance_scale=w, num_images_per_prompt=images,
                              skip_guidance_layers=[1], skip_layer_guidance_scale=slg,
                              skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    try:
        with apply(pipe, Perturb(scale=s, layers=["transformer_blocks.2"])):
            pipe(PROMPT, **kwargs)
    finally:
        recorder.close()
    n = images
    main = [out for skip, out in zip(recorder.skip_layers, recorder.calls) if not skip]
    skips = [out for skip, out in zip(recorder.skip_layers, recorder.calls) if skip]
    assert [out.shape[0] for out in main] == [3 * n] * 4  # [uncond; cond; perturbed]
    assert [out.shape[0] for out in skips] == [n] * 3  # SLG at steps 1..3 (i > 0 and i < 4): no extra rows
    for i, eps in enumerate(recorder.steps):
        uncond, cond, perturbed = main[i][:n], main[i][n : 2 * n], main[i][2 * n :]
        expected = uncond + w * (cond - uncond) + s * (cond - perturbed)
        if i > 0:
            expected = expected + slg * (cond - skips[i - 1])
        torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-5)


def test_sd3_skip_layer_call_is_its_own_layout():
    """The SLG call's rows are the branch ``skip`` (controls keyed on ``cond`` do not act on them)."""
    pipe = tiny_pipeline("sd3")
    probe = Layouts()
    with apply(pipe, probe):
        pipe(PROMPT, **tiny_call_kwargs("sd3", steps=3, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                                        skip_layer_guidance_stop=1.0))
    # steps 0, 1, 2: CFG; SLG at steps 1 and 2 (consecutive repeats are recorded once)
    assert probe.seen == [("cfg_batch", ("uncond", "cond")), ("skip_layers", ("skip",))] * 2


# -- (b) CFG batches, unknown layouts, calls outside a pipeline ---------------------------------------------
def test_even_cfg_batch_with_pag_is_the_formula():
    """Two images under CFG: rows [u0, u1, c0, c1, p0, p1]; eps_i = u_i + w (c_i - u_i) + s (c_i - p_i)."""
    pipe = tiny_pipeline("sd15")
    recorder = Recorder(pipe)
    try:
        with apply(pipe, Perturb(scale=1.5)):
            pipe(PROMPT, **tiny_call_kwargs("sd15", steps=3, num_images_per_prompt=2))
    finally:
        recorder.close()
    for raw, eps in zip(recorder.calls, recorder.steps):
        assert raw.shape[0] == 6
        u, c, p = raw[:2], raw[2:4], raw[4:]
        torch.testing.assert_close(eps, u + 5.0 * (c - u) + 1.5 * (c - p), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("images", [1, 2])
def test_unknown_layout_is_a_named_error(images):
    """diffusers' own PAG pipeline batches [uncond; cond; perturbed]: 3 rows per image. With one image the old
    guess read the odd batch as all cond; with two (6 rows, even) as [u0 u1 c0 | c1 p0 p1]. Now: LayoutError
    naming the denoiser, its rows and the layout expected."""
    from diffusers import StableDiffusionPAGPipeline

    pipe = tiny_pipeline("sd15")
    pag = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    pag.set_progress_bar_config(disable=True)
    expected = (r"UNet2DConditionModel call with 3 rows: layout 'cfg_batch' .* even number of rows" if images == 1
                else r"UNet2DConditionModel call with 6 rows: layout 'cfg_batch' expects 4 rows")
    with apply(pag, Layouts()), pytest.raises(LayoutError, match=expected):
        pag(PROMPT, pag_scale=2.0, **tiny_call_kwargs("sd15", steps=2, num_images_per_prompt=images))


def test_denoiser_outside_a_pipeline_call_is_all_cond():
    """After a CFG pipeline call ended, a direct denoiser call with an even batch is not CFG (the old guess read
    the pipeline's leftover ``_guidance_scale`` and called half the rows uncond)."""
    pipe = tiny_pipeline("sd15")
    probe = Layouts()
    with apply(pipe, probe):
        pipe(PROMPT, **tiny_call_kwargs("sd15", steps=1))
        probe.seen.clear()
        unet = pipe.unet
        sample = torch.randn(2, unet.config.in_channels, 32, 32)
        text = torch.randn(2, 77, unet.config.cross_attention_dim)
        with torch.no_grad():
            unet(sample, 10, encoder_hidden_states=text)
    assert probe.seen == [("outside", ("cond", "cond"))]


# -- (c) FLUX: true CFG is a separate uncond call ----------------------------------------------------------
def test_flux_true_cfg_calls_are_named():
    """FluxPipeline: the cond call (in cache_context("cond")) gets PAG's rows, then the uncond call."""
    pipe = tiny_pipeline("flux")
    probe = Layouts()
    with apply(pipe, [probe, Perturb(scale=2.0, layers=["transformer_blocks.0"])]):
        pipe(PROMPT, negative_prompt="a blue square", **tiny_call_kwargs("flux", steps=2, true_cfg_scale=3.0))
    assert probe.seen == [("cond_batch", ("cond", "perturb")), ("uncond_call", ("uncond",))] * 2


def test_flux_img2img_true_cfg_without_cache_context():
    """FluxImg2ImgPipeline runs true CFG without cache_context: its uncond call is told apart by its text
    embeddings (the second encode_prompt's). eps = neg + t (cond - neg) + s (cond - perturbed).

    Before the layouts (commit 7d6b0cc) its uncond call was read as cond (no cache_context name): it got its own
    perturbed row and fold; measured on this setup, max error 0.115 / 0.135 / 0.112 / 0.110 per step against
    |delta| = 0.29 / 0.29 / 0.18 / 0.19."""
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline(**tiny_pipeline("flux").components)
    pipe.set_progress_bar_config(disable=True)
    recorder, probe = Recorder(pipe), Layouts()
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kwargs = tiny_call_kwargs("flux", steps=4, true_cfg_scale=3.0)
    try:
        with apply(pipe, [probe, Perturb(scale=2.0, layers=["transformer_blocks.0"])]):
            pipe(PROMPT, image=image, strength=1.0, negative_prompt="a blue square", **kwargs)
    finally:
        recorder.close()
    assert set(probe.seen) == {("cond_batch", ("cond", "perturb")), ("uncond_call", ("uncond",))}
    raws = recorder.calls
    assert [r.shape[0] for r in raws] == [2, 1] * len(recorder.steps)
    for i, eps in enumerate(recorder.steps):
        cond, perturbed, neg = raws[2 * i][:1], raws[2 * i][1:], raws[2 * i + 1]
        expected = neg + 3.0 * (cond - neg) + 2.0 * (cond - perturbed)
        torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-5)


def test_flux_call_of_no_known_kind_is_an_error():
    """Inside a FLUX pipeline call, a transformer call with text embeddings that no encode_prompt of this call
    made and no cache_context is neither the cond nor the uncond call: LayoutError."""
    pipe = tiny_pipeline("flux")

    def stray_call(pipe, i, t, kwargs):
        latents = kwargs["latents"]
        text = torch.randn(1, 32, pipe.transformer.config.joint_attention_dim)
        pipe.transformer(hidden_states=latents, timestep=t.expand(1) / 1000, guidance=torch.full((1,), 3.5),
                         pooled_projections=torch.randn(1, pipe.transformer.config.pooled_projection_dim),
                         encoder_hidden_states=text, txt_ids=torch.zeros(32, 3),
                         img_ids=torch.zeros(latents.shape[1], 3), return_dict=False)
        return {}

    with apply(pipe, Layouts()), pytest.raises(LayoutError, match=r"FluxTransformer2DModel call with 1 row: .*"
                                                                    r"neither the prompt's nor the negative"):
        pipe(PROMPT, callback_on_step_end=stray_call, **tiny_call_kwargs("flux", steps=2))


# -- (d) modular pipelines with guiders: not covered, see the report --------------------------------------
