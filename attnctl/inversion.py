"""Inversion of a real image into the initial latent that regenerates it, for every family.

``invert(pipe, image, prompt, steps)`` encodes the image with the pipeline's VAE and runs the sampler backwards:

- UNet family (SD1.x/2.x): deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0) on a ``DDIMScheduler``
  built from the pipeline's scheduler config (trailing spacing, so the first step sees t = 999).
  Regeneration must use that scheduler: ``Inversion.scheduler_in(pipe)`` swaps it in for the call.
- SD3 / FLUX / Chroma / FLUX.2 / Qwen-Image / Z-Image (flow matching): Euler inversion on the pipeline's own
  sigma schedule (x_{s_hi} = x_{s_lo} - (s_lo - s_hi) v), shift ``mu`` included (the probe below runs the
  pipeline's own ``set_timesteps``).

Both are the same linear step run backwards. A sampling step is ``x_low = A x_high + B f(x_high, t)`` (DDIM: A, B
from the alphas and the prediction type; Euler: A = 1, B = s_low - s_high), so inversion is
``x_high = (x_low - B f(x_high, t)) / A`` with f evaluated at x_low (the usual DDIM-inversion approximation) and,
with ``refine=k``, k fixed-point iterations that re-evaluate f at the current estimate of x_high (as in
ReNoise / fixed-point inversion), which shrinks the approximation error.

The denoiser is called with exactly the arguments the pipeline itself would pass (text embeddings, pooled
projections, FLUX's ids and guidance, ...): a probe call of the pipeline records them at its first denoiser
call and stops. So no family-specific conditioning code lives here. What differs by family is declared by its
adapter (``attnctl.adapters.base.Adapter``, "real images"): how an image becomes the pipeline's ``latents=``
(``encode_image``: the exact inverse of the normalisation its decode path undoes: SD3/FLUX/Z-Image shift and
scale, FLUX.2 patchifies and batch-norm normalises, Qwen-Image normalises per channel, FLUX/Qwen-Image pack 2x2
tokens), how those latents reach the denoiser (``pack_latents``: FLUX.2 packs them inside the pipeline), the
denoiser's batch view (Z-Image's per-row lists), its timestep (``timestep_offset``/``timestep_scale``), the sign
the scheduler steps on (Z-Image negates the prediction) and the guidance argument that gives the conditional
prediction alone (``inversion_guidance``).

Quality fix under classifier-free guidance (``fix``): inversion follows the conditional prediction, but
regeneration with CFG w > 1 drifts away from it. ``negative-prompt`` (Miyake et al. 2023, "Negative-prompt
Inversion") regenerates with the source prompt as the negative prompt: the source row's guided prediction then
equals the conditional one exactly, so the path inverts. Only rows whose prompt is the inverted prompt get it;
other rows (an edit's targets) keep ordinary CFG with the caller's negative prompt (default empty). Negative-prompt
Inversion also gives the targets the source prompt as negative; on ShapesWorld that extrapolates away from the
source's shape too (a red circle edited to blue came out as blue star fragments; with the empty negative it came
out a blue circle in the source's box). ``none`` keeps the user's negative prompt (no fix).
Guidance-distilled FLUX has no CFG batch and needs no fix. Qwen-Image's CFG is true CFG (``true_cfg_scale``, default
4 in its pipeline, with a negative prompt): the fix's negative prompts switch it on at that scale; the source row's
guided prediction is its conditional one all the same.

Image input: PIL images, uint8 arrays (H, W, 3) or float arrays / tensors in [0, 1]. Any PIL mode is converted
to RGB (alpha is composited on white). An image whose size differs from the requested ``height`` x ``width``
(default: the model's native size) is resized (bicubic) with ``resize=True`` (the default); with
``resize=False`` it is an error naming both sizes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .adapters import adapter_for
from .errors import AttnctlError, ControlError

FIXES = ("negative-prompt", "none")


@dataclass
class Inversion:
    """An inverted image. ``latents``: the initial latent in the pipeline's own format (1, ...), i.e. what the
    pipeline's ``latents=`` argument takes ((1, C, h, w); FLUX, Qwen-Image: packed (1, h*w/4, 4C); FLUX.2:
    patchified (1, 4C, h/2, w/2)).

    ``generate_kwargs(prompts)`` gives the pipeline-call arguments that regenerate it (one row per prompt, all
    starting from the same latent); run the call inside ``scheduler_in(pipe)``.
    """

    latents: torch.Tensor
    prompt: str
    steps: int
    guidance_scale: float
    fix: str
    height: int
    width: int
    scheduler: object | None = None
    call_kwargs: dict = field(default_factory=dict)
    image: np.ndarray | None = None  # the (resized) input, uint8 (H, W, 3)
    # negatives (one per row) -> the call arguments that set them, None where the call runs no CFG (the adapter's
    # ``negative_prompt_args``); unset: ``negative_prompt=negatives``
    negative_args: Callable[[list[str]], dict | None] | None = None

    def generate_kwargs(self, prompts: list[str] | None = None) -> dict:
        prompts = [self.prompt] if prompts is None else list(prompts)
        kwargs = dict(self.call_kwargs)
        kwargs.update(prompt=prompts, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                      height=self.height, width=self.width,
                      latents=self.latents.expand(len(prompts), *self.latents.shape[1:]).clone())
        if self.fix == "negative-prompt" and self.guidance_scale > 1:
            other = kwargs.pop("negative_prompt", None) or ""
            if not isinstance(other, str):
                raise ControlError("inversion: give one negative prompt string for the rows other than the source")
            negatives = [self.prompt if p == self.prompt else other for p in prompts]
            args = {"negative_prompt": negatives} if self.negative_args is None else self.negative_args(negatives)
            kwargs.update(args or {})
        return kwargs

    @contextlib.contextmanager
    def scheduler_in(self, pipe) -> Iterator[None]:
        """Use the inversion's scheduler for the calls in this block (DDIM for the UNet family)."""
        with use_scheduler(pipe, self.scheduler):
            yield


@contextlib.contextmanager
def use_scheduler(pipe, scheduler) -> Iterator[None]:
    """Temporarily replace ``pipe.scheduler`` (None: leave it). Enter it *before* ``attnctl.apply``: the engine
    wraps the scheduler object it finds when it installs."""
    if scheduler is None:
        yield
        return
    previous = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = previous


def native_size(pipe) -> tuple[int, int]:
    """The pipeline's default (height, width) in pixels."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        size = unet.config.sample_size
    else:
        size = getattr(pipe, "default_sample_size", None) or getattr(pipe.transformer.config, "sample_size", None)
        if size is None:  # the pipeline hard-codes its default (Z-Image: 1024), declared by the adapter
            pixels = adapter_for(pipe).native_pixels
            if pixels is None:
                raise ControlError(f"{type(pipe).__name__}: no default image size found; pass height and width")
            return int(pixels), int(pixels)
    size = size if isinstance(size, int) else size[0]
    return int(size) * factor, int(size) * factor


def load_image(image, height: int, width: int, *, resize: bool = True) -> np.ndarray:
    """Any supported image input -> uint8 (height, width, 3). See the module docstring for the rules."""
    from PIL import Image

    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        try:
            image = Image.open(image)
            image.load()
        except OSError as exc:
            raise ControlError(f"cannot read the image {str(image)!r}: {exc}") from None
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ControlError(f"image: expected (H, W), (H, W, 1|3|4) or (1|3|4, H, W), got shape {image.shape}")
        if arr.dtype != np.uint8:
            if arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
                raise ControlError(f"image: float pixel values must lie in [0, 1], got [{arr.min():.3g}, "
                                   f"{arr.max():.3g}] (pass uint8 for 0..255)")
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
        image = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
    if not isinstance(image, Image.Image):
        raise ControlError(f"image: expected a path, PIL image, array or tensor, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    image = image.convert("RGB")
    if image.size != (width, height):
        if not resize:
            raise ControlError(f"image is {image.size[0]}x{image.size[1]} (width x height) but the model runs at "
                               f"{width}x{height}; resize it, pass height/width, or allow resize=True")
        image = image.resize((width, height), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8).copy()


def encode_image(pipe, image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> the pipeline's ``latents=`` format (the posterior mean, normalised and packed as the
    family's adapter declares: ``Adapter.encode_image``)."""
    vae = pipe.vae
    device, dtype = vae.device, vae.dtype
    x = torch.from_numpy(image).to(device=device, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1.0
    with torch.no_grad():
        return adapter_for(pipe).encode_image(pipe, x.to(dtype))


def decode_latents(pipe, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Latents in the pipeline's ``latents=`` format -> float images (B, H, W, 3) in [0, 1], by the pipeline's own
    decode path (``Adapter.decode_latents``)."""
    with torch.no_grad():
        pixels = adapter_for(pipe).decode_latents(pipe, latents.to(pipe.vae.dtype), height, width)
    return ((pixels.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


class _Probed(Exception):
    """Raised from the denoiser's pre-hook to stop the probe call."""


def probe(pipe, prompt: str, steps: int, guidance_scale: float, latents: torch.Tensor, **call_kwargs):
    """Run the pipeline up to its first denoiser call; return (denoiser kwargs, timesteps, sigmas or None)."""
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    signature = inspect.signature(type(denoiser).forward)
    captured: dict = {}

    def hook(module, args, kwargs):
        arguments = dict(signature.bind(module, *args, **kwargs).arguments)
        arguments.pop("self", None)
        extra = arguments.pop("kwargs", None)
        if isinstance(extra, dict):
            arguments.update(extra)
        captured.update(arguments)
        raise _Probed

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents,
             output_type="latent", **call_kwargs)
    except _Probed:
        pass
    except AttnctlError:
        raise
    except Exception as exc:  # the pipeline could not make the call: say what inversion asked of it
        raise ControlError(
            f"inversion: {type(pipe).__name__} failed before its first denoiser call ({type(exc).__name__}: {exc}). "
            "Inversion makes a text-to-image call of the pipeline (the prompt and the image's latents, no input "
            "image): pipelines that need an input image (img2img, inpainting, Qwen-Image-Edit) cannot be inverted "
            "through") from exc
    finally:
        handle.remove()
    if not captured:
        raise ControlError("inversion: the pipeline never called its denoiser")
    scheduler = pipe.scheduler
    sigmas = getattr(scheduler, "sigmas", None)
    return captured, scheduler.timesteps.clone(), (sigmas.clone() if sigmas is not None else None)


def _ddim_scheduler(pipe):
    from diffusers import DDIMScheduler

    config = dict(pipe.scheduler.config)
    config.update(timestep_spacing="trailing", clip_sample=False, thresholding=False)
    return DDIMScheduler.from_config(config)


def _ddim_coefficients(scheduler, steps: int) -> list[tuple[float, float, float]]:
    """(t, A, B) per sampling step: DDIMScheduler.step (eta 0) computes x_prev = A x_t + B model_output."""
    scheduler.set_timesteps(steps)
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    kind = scheduler.config.prediction_type
    out = []
    for t in scheduler.timesteps.tolist():
        a_t = float(scheduler.alphas_cumprod[t])
        prev = t - ratio
        a_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        s_t, r_t, s_p, r_p = math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_prev), math.sqrt(1 - a_prev)
        if kind == "epsilon":  # x0 = (x - r_t e) / s_t
            a, b = s_p / s_t, r_p - s_p * r_t / s_t
        elif kind == "v_prediction":  # x0 = s_t x - r_t v, e = r_t x + s_t v
            a, b = s_p * s_t + r_p * r_t, r_p * s_t - s_p * r_t
        elif kind == "sample":  # e = (x - s_t x0) / r_t
            a, b = r_p / r_t, s_p - r_p * s_t / r_t
        else:
            raise ControlError(f"inversion: unsupported prediction_type {kind!r}")
        out.append((float(t), a, b))
    return out


def _flow_coefficients(sigmas: torch.Tensor, timesteps: torch.Tensor) -> list[tuple[float, float, float]]:
    """(t, A, B) per Euler step of FlowMatchEulerDiscreteScheduler: x_next = x + (s_next - s) v."""
    s = sigmas.double().tolist()
    return [(float(t), 1.0, s[i + 1] - s[i]) for i, t in enumerate(timesteps.tolist())]


def invert(pipe, image, prompt: str, steps: int = 25, *, guidance_scale: float = 5.0, fix: str = "negative-prompt",
           height: int | None = None, width: int | None = None, resize: bool = True, refine: int = 0,
           **call_kwargs) -> Inversion:
    """Invert ``image`` under ``prompt`` with ``steps`` sampling steps; see the module docstring.

    ``guidance_scale`` is the scale the regeneration (and the edit) will use: with ``fix="negative-prompt"`` the
    source row is guided towards itself, so the scale only matters for target rows. ``refine``: fixed-point
    iterations per step (0 = plain DDIM / Euler inversion; each costs one more denoiser call per step).
    ``call_kwargs`` (e.g. FLUX's ``max_sequence_length``) go to the probe and to every regeneration call.
    """
    if fix not in FIXES:
        raise ControlError(f"inversion fix {fix!r} is not known; allowed: {', '.join(FIXES)}")
    if steps < 1:
        raise ControlError(f"inversion steps must be >= 1, got {steps}")
    adapter = adapter_for(pipe)
    if adapter.inversion_unsupported:  # the adapter says why this family's latents cannot be inverted here
        raise ControlError(f"inversion does not support the {adapter.family} family: {adapter.inversion_unsupported}")
    if not (height and width):
        default_h, default_w = native_size(pipe)
        height, width = height or default_h, width or default_w
    multiple = int(getattr(pipe, "vae_scale_factor", 8)) * adapter.latent_patch
    if height % multiple or width % multiple:
        raise ControlError(f"height and width must be multiples of {multiple} for this model, got {height}x{width}")
    pixels = load_image(image, height, width, resize=resize)
    clean = encode_image(pipe, pixels)

    scheduler = None
    if getattr(pipe, "unet", None) is not None:
        scheduler = _ddim_scheduler(pipe)
    with use_scheduler(pipe, scheduler):
        # Conditional prediction only (CFG off; a guidance-distilled model keeps its guidance value).
        params, timesteps, sigmas = probe(pipe, prompt, steps, adapter.inversion_guidance(pipe, guidance_scale),
                                          clean.clone(), height=height, width=width, **call_kwargs)
        if scheduler is not None:
            coefficients = _ddim_coefficients(scheduler, steps)
        else:
            if sigmas is None:
                raise ControlError(f"inversion: {type(pipe.scheduler).__name__} has no sigmas; flow-matching "
                                   "inversion needs FlowMatchEulerDiscreteScheduler")
            coefficients = _flow_coefficients(sigmas, timesteps)
    denoiser = adapter.denoiser(pipe)
    params = adapter.to_batch(params)  # the engine's batch view (Z-Image: its per-row lists as one batch)
    seen = params[adapter.latent_arg]
    packed = adapter.pack_latents(pipe, clean)
    if tuple(seen.shape) != tuple(packed.shape):
        raise ControlError(f"inversion: {type(pipe).__name__} passes its denoiser latents of shape {tuple(seen.shape)} "
                           f"for an image whose latents are {tuple(packed.shape)} (reference-image or other extra "
                           "latents in the call); inversion supports text-to-image calls")
    template = params.get(adapter.timestep_arg)

    def predict(x: torch.Tensor, t: float) -> torch.Tensor:
        args = dict(params)
        args[adapter.latent_arg] = x.to(seen.dtype)
        value = (t - adapter.timestep_offset) / adapter.timestep_scale  # what the pipeline passes for timestep t
        if isinstance(template, torch.Tensor):
            args[adapter.timestep_arg] = torch.full_like(template, value)
        else:
            args[adapter.timestep_arg] = value
        out = denoiser(**adapter.from_batch(args))
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        return adapter.velocity_sign * adapter.sample_to_batch(out).float()

    x = packed.float()
    with torch.no_grad():
        for t, a, b in reversed(coefficients):
            low = x
            high = (low - b * predict(low, t)) / a
            for _ in range(refine):
                high = (low - b * predict(high, t)) / a
            x = high
    latents = adapter.unpack_latents(pipe, x, clean)
    return Inversion(latents=latents.to(clean.dtype), prompt=prompt, steps=steps, guidance_scale=guidance_scale,
                     fix=fix, height=height, width=width, scheduler=scheduler, call_kwargs=dict(call_kwargs),
                     image=pixels, negative_args=functools.partial(adapter.negative_prompt_args, pipe,
                                                                   call_kwargs=dict(call_kwargs)))


def regenerate(pipe, inversion: Inversion, prompts: list[str] | None = None, **overrides):
    """Run the pipeline from the inverted latent (``output_type`` defaults to ``"np"``)."""
    kwargs = inversion.generate_kwargs(prompts)
    kwargs.setdefault("output_type", "np")
    kwargs.update(overrides)
    with inversion.scheduler_in(pipe):
        return pipe(**kwargs)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of two uint8 or [0, 1] images (H, W, 3); ``mask`` (H, W) bool restricts the pixels compared."""
    a = a.astype(np.float64) / (255.0 if a.dtype == np.uint8 else 1.0)
    b = b.astype(np.float64) / (255.0 if b.dtype == np.uint8 else 1.0)
    diff = (a - b) ** 2
    if mask is not None:
        if not mask.any():
            return float("nan")
        diff = diff[mask]
    mse = float(diff.mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


__all__ = ["FIXES", "Inversion", "decode_latents", "encode_image", "invert", "load_image", "native_size", "psnr",
           "regenerate", "use_scheduler"]
