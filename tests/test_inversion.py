"""Inversion: DDIM (UNet) and flow-matching Euler (SD3, FLUX) inversion regenerate their input."""

import functools

import numpy as np
import pytest
import torch

import attnctl
from attnctl.errors import ControlError
from attnctl.inversion import _ddim_coefficients, encode_image, invert, load_image, psnr, regenerate
from attnctl.shapes.data import make_dataset
from attnctl.testing import tiny_call_kwargs, tiny_pipeline


@pytest.fixture(scope="module")
def shapes():
    return attnctl.load("shapes")


@pytest.fixture(scope="module")
def renders():
    images, captions, _ = make_dataset(4, seed=123, max_objects=2)
    return images, captions


def _uint8(x):
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def _reconstruction_psnr(pipe, images, captions, steps, **kwargs):
    values = []
    for image, caption in zip(images, captions):
        inversion = invert(pipe, image, caption, steps, guidance_scale=4.5, **kwargs)
        values.append(psnr(image, _uint8(regenerate(pipe, inversion).images[0])))
    return np.array(values)


def test_shapes_reconstruction_at_few_steps(shapes, renders):
    # Measured (4 renders, 4 DDIM steps, CFG 4.5): negative-prompt fix 33.0/31.4/31.5/33.6 dB, mean 32.4;
    # without it 33.0/25.8/26.6/33.2, mean 29.6. The VAE alone reaches about 33.8 dB on such renders.
    fixed = _reconstruction_psnr(shapes, *renders, 4)
    unfixed = _reconstruction_psnr(shapes, *renders, 4, fix="none")
    assert fixed.min() >= 28.0 and fixed.mean() >= 30.0
    assert fixed.mean() > unfixed.mean() + 1.0


@pytest.mark.slow
def test_shapes_reconstruction_at_25_steps(shapes):
    images, captions, _ = make_dataset(8, seed=123, max_objects=2)
    values = _reconstruction_psnr(shapes, images, captions, 25)
    assert values.mean() >= 30.0 and values.min() >= 25.0  # measured: mean 33.7, min 30.8


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_coefficients_match_the_scheduler(prediction_type):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, timestep_spacing="trailing", clip_sample=False,
                              set_alpha_to_one=False)
    gen = torch.Generator().manual_seed(0)
    for t, a, b in _ddim_coefficients(scheduler, 7):
        x = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
        out = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
        expected = scheduler.step(out, int(t), x).prev_sample
        torch.testing.assert_close(a * x + b * out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_inversion_converges_with_fixed_point_refinement(family):
    pipe = tiny_pipeline(family)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    kwargs = dict(height=32, width=32, guidance_scale=3.5 if family == "flux" else 5.0)
    if family == "flux":
        kwargs["max_sequence_length"] = 32
    errors = []
    for refine in (0, 6):
        inversion = invert(pipe, image, "a red circle", 4, refine=refine, **kwargs)
        latents = regenerate(pipe, inversion, output_type="latent").images
        clean = encode_image(pipe, inversion.image)
        errors.append(float((latents - clean).abs().max() / clean.abs().max()))
    # measured: 0.15 / 3e-5 (sd3), 0.16 / 3e-5 (flux)
    assert errors[1] < 1e-3 < errors[0]


def test_unet_inversion_runs_on_sdxl_and_keeps_the_scheduler():
    pipe = tiny_pipeline("sdxl")
    before = pipe.scheduler
    inversion = invert(pipe, np.full((32, 32, 3), 200, np.uint8), "a red circle", 3, height=32, width=32)
    assert inversion.latents.shape == (1, 4, 16, 16) and torch.isfinite(inversion.latents).all()
    assert type(inversion.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler is before
    out = regenerate(pipe, inversion, output_type="latent").images
    assert out.shape == (1, 4, 16, 16) and pipe.scheduler is before


def test_image_inputs_and_errors(tmp_path):
    from PIL import Image

    rgba = Image.new("RGBA", (40, 24), (255, 0, 0, 0))  # fully transparent: composited on white
    out = load_image(rgba, 32, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and (out == 255).all()
    grey = load_image(np.full((32, 32), 0.5, np.float32), 32, 32)
    assert (grey == 128).all()
    path = tmp_path / "x.png"
    Image.new("L", (32, 32), 10).save(path)
    assert (load_image(path, 32, 32) == 10).all()
    with pytest.raises(ControlError, match=r"40x24 \(width x height\).*32x32"):
        load_image(rgba, 32, 32, resize=False)
    with pytest.raises(ControlError, match=r"must lie in \[0, 1\]"):
        load_image(np.full((32, 32, 3), 3.0), 32, 32)
    with pytest.raises(ControlError, match="shape"):
        load_image(np.zeros((32, 32, 5), np.uint8), 32, 32)
    with pytest.raises(ControlError, match="cannot read the image"):
        load_image(tmp_path / "missing.png", 32, 32)
    pipe = tiny_pipeline("sd15")
    with pytest.raises(ControlError, match="fix 'null'.*allowed: negative-prompt, none"):
        invert(pipe, out, "a red circle", 2, fix="null")
    with pytest.raises(ControlError, match="multiples of 2"):
        invert(pipe, out, "a red circle", 2, height=33, width=32)


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert psnr(a, a) == float("inf")
    assert abs(psnr(a, b) - 10 * np.log10(48)) < 1e-9
    mask = np.zeros((4, 4), bool)
    mask[1:] = True
    assert psnr(a, b, mask) == float("inf")


# -- FLUX.2, Qwen-Image, Z-Image: what their adapters declare, and inversion through it -------------------------
# (steps, refine, call arguments) at which fixed-point refinement converges on each tiny random pipeline. Their
# random transformers are stiffer than tiny:flux's and their schedules end on a long step (FLUX.2's empirical mu
# leaves sigma 0.48 -> 0.3 -> 0 at 16 steps, Z-Image's shift 3 leaves 0.17 -> 0), so FLUX's 4 steps do not contract
# there: at 4 steps and refine 20 the error stays 0.024 (FLUX.2) and 1.5 (Z-Image).
NEW_FAMILIES = {
    "flux2": (16, 14, dict(max_sequence_length=32)),
    "qwenimage": (4, 20, {}),
    "zimage": (20, 16, dict(max_sequence_length=64)),
}


def _nontrivial_normalisation(pipe, family):
    """Give the tiny VAE's latent normalisation values far from the identity (a fresh BatchNorm has mean 0, var 1;
    tiny:qwenimage's latents_mean/std are 0/1), so that a missing or misordered step shows."""
    gen = torch.Generator().manual_seed(7)
    if family == "flux2":
        bn = pipe.vae.bn
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.5)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 2 + 0.25)
    elif family == "qwenimage":
        z = pipe.vae.config.z_dim
        pipe.vae.register_to_config(latents_mean=(torch.randn(z, generator=gen) * 0.5).tolist(),
                                    latents_std=(torch.rand(z, generator=gen) * 2 + 0.25).tolist())
    else:  # Z-Image: FLUX.1's shift and scale, already far from (0, 1) in tiny:zimage
        assert pipe.vae.config.shift_factor > 0.1 and abs(pipe.vae.config.scaling_factor - 1) > 0.5


@functools.lru_cache(maxsize=None)
def _family_pipe(family):
    """One tiny pipeline per family for this file (building FLUX.2's is slow), its normalisation made non-trivial."""
    pipe = tiny_pipeline(family)
    _nontrivial_normalisation(pipe, family)
    return pipe


def _loop_and_decoded(pipe, family, **overrides):
    """One pipeline call: its denoising loop's last latents (the callback's) and what it passed to ``vae.decode``."""
    seen = {}
    original = pipe.vae.decode

    def record(z, *args, **kwargs):
        seen["decoded"] = z.clone()
        return original(z, *args, **kwargs)

    def step_end(p, i, t, kwargs):
        seen["loop"] = kwargs["latents"].clone()
        return {}

    pipe.vae.decode = record
    try:
        out = pipe(prompt="a red circle", **tiny_call_kwargs(family, steps=2, output_type="np",
                                                     callback_on_step_end=step_end, **overrides))
    finally:
        del pipe.vae.decode
    return seen["loop"], seen["decoded"], out.images


@pytest.mark.parametrize("family", list(NEW_FAMILIES))
def test_latent_normalisation_is_the_exact_inverse_of_the_pipelines_decode_float64(family):
    """What the pipeline passes to ``vae.decode``, normalised by the adapter in float64, is the pipeline's own last
    latents (packed as its denoiser sees them): the exact inverse of its decode path, every step and its order.
    And back: the adapter's decode path is the pipeline's, to the decoded pixels."""
    from attnctl.adapters import adapter_for
    from attnctl.inversion import decode_latents

    pipe = _family_pipe(family)
    adapter = adapter_for(pipe)
    loop, decoded, images = _loop_and_decoded(pipe, family)
    normal = adapter.normalize_latents(pipe, decoded.double())
    assert normal.dtype == torch.float64
    torch.testing.assert_close(adapter.pack_latents(pipe, normal), loop.double(), atol=1e-5, rtol=1e-5)
    unpacked = adapter.unpack_latents(pipe, loop.double(), normal)
    torch.testing.assert_close(adapter.denormalize_latents(pipe, unpacked, 32, 32), decoded.double(), atol=1e-5,
                               rtol=1e-5)
    pixels = decode_latents(pipe, unpacked.float(), 32, 32)
    np.testing.assert_allclose(pixels, images, atol=1e-5)


def test_normalisation_steps_each_matter():
    """Each family's normalisation differs from dropping any one of its steps, by far more than the tolerance of the
    test above (1e-5), at the values that test uses."""
    from attnctl.adapters import adapter_for

    gen = torch.Generator().manual_seed(0)
    for family in NEW_FAMILIES:
        pipe = _family_pipe(family)
        adapter = adapter_for(pipe)
        z = torch.randn((1, 4, 1, 16, 16) if family == "qwenimage" else (1, 4, 16, 16), generator=gen,
                        dtype=torch.float64)
        full = adapter.normalize_latents(pipe, z)
        if family == "flux2":
            patched = pipe._patchify_latents(z)
            mean, std = adapter._bn_stats(pipe, patched)
            variants = [patched, patched - mean, patched / std, patched / std - mean]
        elif family == "qwenimage":
            mean, std = adapter._channel_stats(pipe, z[:, :, 0])
            flat = z[:, :, 0]
            variants = [pipe._pack_latents(v, 1, 4, 16, 16) for v in (flat, flat - mean, flat / std, flat / std - mean)]
        else:
            shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
            variants = [z, z - shift, z * scale, z * scale - shift]
        for variant in variants:
            assert (variant - full).abs().max() > 1e-2, family  # Z-Image z * scale: shift * scale = 0.042 off


@pytest.mark.parametrize("family", ["flux2", "qwenimage"])
def test_image_encoding_equals_the_pipelines_own_encoder(family, monkeypatch):
    """FLUX.2's ``_encode_vae_image`` (its reference-image encoder, posterior mode) and Qwen-Image img2img's (with the
    posterior mean instead of a sample) give what ``attnctl.inversion.encode_image`` gives."""
    from attnctl.adapters import adapter_for

    pipe = _family_pipe(family)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 127.5 - 1.0
    ours = encode_image(pipe, image)
    with torch.no_grad():
        if family == "flux2":
            theirs = pipe._encode_vae_image(x, generator=None)
        else:
            import diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img as module

            monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
            img2img = module.QwenImageImg2ImgPipeline(**pipe.components)
            theirs = img2img._encode_vae_image(x.unsqueeze(2), generator=None)[:, :, 0]  # (B, C, h, w)
            theirs = pipe._pack_latents(theirs, 1, 4, 8, 8)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert ours.shape == {"flux2": (1, 16, 8, 8), "qwenimage": (1, 16, 16)}[family]
    assert adapter_for(pipe).pack_latents(pipe, ours).shape[1:] == {"flux2": (64, 16), "qwenimage": (16, 16)}[family]


def _last_loop_latents(pipe, inversion, **overrides):
    seen = {}

    def step_end(p, i, t, kwargs):
        seen["loop"] = kwargs["latents"].clone()
        return {}

    images = regenerate(pipe, inversion, callback_on_step_end=step_end, **overrides).images
    return seen["loop"], images


@pytest.mark.parametrize("family", list(NEW_FAMILIES))
def test_new_family_inversion_regenerates_its_latents(family):
    """Inversion then regeneration under the same prompt (CFG 4 with the negative-prompt fix) returns the image's
    latents: relative max error < 1e-3 with fixed-point refinement (FLUX's test's threshold, at the steps where
    each tiny pipeline contracts), > 1e-2 without; the regenerated image equals the VAE's decoding of the image's
    latents (> 40 dB)."""
    from attnctl.adapters import adapter_for
    from attnctl.inversion import decode_latents

    pipe = _family_pipe(family)
    adapter = adapter_for(pipe)
    steps, refine, extra = NEW_FAMILIES[family]
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    errors = []
    for r in (0, refine):
        inversion = invert(pipe, image, "a red circle", steps, refine=r, height=32, width=32, guidance_scale=4.0,
                           **extra)
        loop, images = _last_loop_latents(pipe, inversion, output_type="np")
        clean = encode_image(pipe, inversion.image)
        packed = adapter.pack_latents(pipe, clean)
        errors.append(float((loop - packed).abs().max() / packed.abs().max()))
    # measured: flux2 0.22 / 6.6e-7, qwenimage 0.64 / 3.2e-6, zimage 0.52 / 2.6e-5 (FLUX at 4 steps: 0.16 / 3e-5)
    assert errors[1] < 1e-3 and errors[0] > 1e-2, errors
    ceiling = decode_latents(pipe, clean, 32, 32)[0]
    assert psnr(ceiling, images[0]) > 40.0  # measured: 131, 135, 107 dB (without refinement 22, 30, 20 dB)


def test_refusals_name_the_family_and_the_reason(monkeypatch):
    """No family declares ``inversion_unsupported`` today; the declaration is still the one place a family says why
    it cannot be inverted (set here). A pipeline that cannot make inversion's text-to-image call (Qwen-Image-Edit
    without its input image) is a ``ControlError`` saying so, and a call whose denoiser latents are not the image's
    (reference latents packed beside them) is refused rather than inverted wrongly (simulated here by packing the
    image's latents one token short)."""
    from attnctl.adapters import ADAPTERS, adapter_for

    pipe = _family_pipe("qwenimage")
    image = np.zeros((32, 32, 3), np.uint8)
    cls = type(adapter_for(pipe))
    assert not any(adapter.inversion_unsupported for adapter in ADAPTERS.values())
    with monkeypatch.context() as patch:
        patch.setattr(cls, "inversion_unsupported", "a reason")
        with pytest.raises(ControlError, match="does not support the qwenimage family: a reason"):
            invert(pipe, image, "a red circle", 2, height=32, width=32)
    import diffusers

    edit = diffusers.QwenImageEditPipeline(**pipe.components, processor=None)  # needs its input image
    with pytest.raises(ControlError, match="QwenImageEditPipeline failed before its first denoiser call .*"
                                           "pipelines that need an input image"):
        invert(edit, image, "a red circle", 2, height=32, width=32)
    monkeypatch.setattr(cls, "pack_latents", lambda self, pipe, latents: latents[:, 1:])
    with pytest.raises(ControlError, match=r"latents of shape \(1, 16, 16\) for an image whose latents are "
                                           r"\(1, 15, 16\).*text-to-image calls"):
        invert(pipe, image, "a red circle", 2, height=32, width=32)


@pytest.mark.parametrize("family", list(NEW_FAMILIES))
def test_an_edit_recipe_inverts_a_real_image(family, tmp_path):
    """``attnctl run`` of an edit recipe with ``image:`` on each new family: validated (no refusal), inverted and
    edited; the run writes the target with the source and mask beside it."""
    import json

    from PIL import Image

    from attnctl.recipe import load_recipe
    from attnctl.run import run_recipe

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    recipe = load_recipe({"model": f"tiny:{family}", "prompt": "a red circle", "steps": 2, "guidance_scale": 4.0,
                          "height": 32, "width": 32,
                          "controls": {"edit": {"target": "a blue circle", "blend": {},
                                                "image": str(tmp_path / "in.png")}}})
    folder = run_recipe(recipe, out=tmp_path / "runs", progress=False, pipe=_family_pipe(family))
    (entry,) = json.loads((folder / "run.json").read_text())["images"]
    assert set(entry["files"]) == {"source", "mask"} and entry["info"]["source_image"] == str(tmp_path / "in.png")
    assert Image.open(folder / entry["files"]["source"]).size == (32, 32)
