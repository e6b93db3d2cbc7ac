"""Training of the embedded ShapesWorld models in stock diffusers formats.

Two models share one recipe:

* ``shapes``: an ``AutoencoderKL`` (64x64x3 -> 16x16x4) trained first, then a ``UNet2DConditionModel`` with
  cross-attention and a ``CLIPTextModel`` trained jointly (v-prediction, linear DDPM betas, 10% caption dropout,
  AdamW, EMA). Saved as a ``StableDiffusionPipeline`` folder.
* ``shapes-dit``: the same VAE (with ``shift_factor``), an ``SD3Transformer2DModel`` and two
  ``CLIPTextModelWithProjection`` encoders sharing our word-level tokenizer, no T5, trained with the rectified
  flow (flow-matching) loss. Saved as a ``StableDiffusion3Pipeline`` folder.

Training is seeded and resumable: ``out_dir/state.pt`` holds the phase, step, weights, optimiser, EMA and the
VAE's latent statistics; every batch is drawn from a generator seeded by ``(seed, step)``, so a resumed run
draws the same batches as an uninterrupted one. The dataset is rendered once into a uint8 tensor in memory.

Text conditioning in training reproduces the pipelines' own ``encode_prompt`` exactly (the tests check it):
SD uses the text encoder's last hidden state over 77 padded tokens; SD3 concatenates the two encoders'
penultimate hidden states, zero-pads them to ``joint_attention_dim`` and appends ``max_sequence_length`` zero
tokens in place of T5.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import VOCAB, ShapesError, sample_scene, render, scene_rng

MODELS = ("shapes", "shapes-dit")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the checkpoint and the model card).

    Defaults are the ``shapes`` model's; ``default_config("shapes-dit")`` adjusts the denoiser ones.
    """

    model: str = "shapes"
    seed: int = 0
    # data
    dataset_size: int = 32000
    image_size: int = 64
    # Probabilities of 1, 2, 3, 4 objects per scene (v1: (0.4, 0.4, 0.2)). Crowded scenes are where subjects
    # compete for attention, so v2 trains on them.
    objects_p: tuple[float, ...] = (0.3, 0.35, 0.2, 0.15)
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_steps: int = 1100
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # text encoder(s)
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_projection: int = 64  # shapes-dit pooled projection per encoder
    # denoiser
    unet_channels: tuple[int, ...] = (48, 96, 96)  # v1: (32, 64, 64)
    unet_heads: int = 4
    # Cross-attention at every resolution, the latent grid itself included (16x16 for 64 px images, the map size
    # SD1.5 has at 512 px). v1 had none at the first level (8x8 was its finest map).
    unet_cross_all_levels: bool = True
    unet_layers_per_block: int = 1
    dit_layers: int = 4
    dit_heads: int = 4
    dit_head_dim: int = 32
    dit_patch: int = 2
    dit_t5_tokens: int = 256  # the SD3 pipeline's default max_sequence_length: zero tokens in place of T5
    dit_collapse_pad: bool = True  # train with one zero token weighted as dit_t5_tokens (exact, ~3x cheaper)
    steps: int = 8000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ema: float = 0.998
    caption_dropout: float = 0.1
    # bookkeeping
    checkpoint_every: int = 500
    log_every: int = 100
    threads: int | None = None
    vae_from: str | None = None  # a pipeline folder or checkpoint whose VAE to reuse (skips the VAE phase)
    # A pipeline folder whose denoiser and text encoder(s) start the run (same architecture; fresh optimiser).
    # Continues a model whose training checkpoint is gone, e.g. a shipped one, in another session.
    init_from: str | None = None
    extra: dict = field(default_factory=dict)


def default_config(model: str, **overrides) -> TrainConfig:
    """The default configuration of ``model`` (``"shapes"`` or ``"shapes-dit"``) with ``overrides`` applied."""
    if model not in MODELS:
        from ..errors import did_you_mean

        raise ShapesError(f"unknown ShapesWorld model {model!r}; allowed: {', '.join(MODELS)}{did_you_mean(model, MODELS)}")
    cfg = TrainConfig(model=model)
    if model == "shapes-dit":
        cfg = replace(cfg, text_layers=2, steps=6000, batch=64, dataset_size=24000, objects_p=(0.4, 0.4, 0.2))
    unknown = set(overrides) - set(asdict(cfg))
    if unknown:
        raise ShapesError(f"unknown training option(s) {sorted(unknown)}; allowed: {sorted(asdict(cfg))}")
    return replace(cfg, **overrides)


def tiny_config(model: str, **overrides) -> TrainConfig:
    """A configuration small enough for a smoke test (seconds on CPU)."""
    small = dict(
        dataset_size=64, image_size=32, vae_channels=(8, 16), vae_steps=3, vae_batch=4, text_hidden=32,
        text_layers=2, text_projection=16, unet_channels=(16, 32), unet_heads=2, dit_layers=2, dit_heads=2,
        dit_head_dim=8, dit_t5_tokens=8, steps=3, batch=4, warmup=1, checkpoint_every=2, log_every=1,
    )
    small.update(overrides)
    return default_config(model, **small)


# ----------------------------------------------------------------------------------------------------------
# data


def render_dataset(cfg: TrainConfig, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Render ``cfg.dataset_size`` scenes: ``images: uint8 (N, 3, H, W)`` and their captions."""
    from tqdm.auto import tqdm

    from .data import MAX_OBJECTS

    p = np.asarray(cfg.objects_p, dtype=float)
    if not 1 <= len(p) <= MAX_OBJECTS or (p < 0).any() or p.sum() <= 0:
        raise ShapesError(f"objects_p {tuple(cfg.objects_p)}: give 1 to {MAX_OBJECTS} non-negative probabilities "
                          "(of 1, 2, ... objects per scene) with a positive sum")
    p = p / p.sum()
    images = np.empty((cfg.dataset_size, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    captions = []
    for i in tqdm(range(cfg.dataset_size), desc="render", disable=not progress, mininterval=2):
        rng = scene_rng(cfg.seed, i)
        n = int(rng.choice(len(p), p=p)) + 1
        scene = sample_scene(rng, min_objects=n, max_objects=n)
        images[i] = np.asarray(render(scene, cfg.image_size))
        captions.append(scene.caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """``input_ids: long (N, 77)`` padded exactly as the pipelines pad."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) in [-1, 1]."""
    return images_u8.float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------------------------------------
# models


def build_tokenizer():
    from ..tokenizers import build_clip_tokenizer

    return build_clip_tokenizer(VOCAB)


def build_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(cfg.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=8, sample_size=cfg.image_size,
    )


def _clip_config(cfg: TrainConfig, tokenizer, projection: bool):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if projection:
        kwargs["projection_dim"] = cfg.text_projection
    return CLIPTextConfig(**kwargs)


def build_denoiser(cfg: TrainConfig, tokenizer):
    """``(denoiser, [text encoders])`` for ``cfg.model``, randomly initialised from ``cfg.seed``."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(cfg.seed + 1)
    latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    if cfg.model == "shapes":
        from diffusers import UNet2DConditionModel

        n = len(cfg.unet_channels)
        plain = 0 if cfg.unet_cross_all_levels else 1  # levels without attention, from the finest
        unet = UNet2DConditionModel(
            sample_size=latent, in_channels=4, out_channels=4, block_out_channels=tuple(cfg.unet_channels),
            layers_per_block=cfg.unet_layers_per_block,
            down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (n - plain),
            up_block_types=("CrossAttnUpBlock2D",) * (n - plain) + ("UpBlock2D",) * plain,
            cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_heads,  # diffusers: heads per layer
            norm_num_groups=8,
        )
        return unet, [CLIPTextModel(_clip_config(cfg, tokenizer, projection=False))]
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=cfg.dit_patch, in_channels=4, out_channels=4, num_layers=cfg.dit_layers,
        attention_head_dim=cfg.dit_head_dim, num_attention_heads=cfg.dit_heads,
        joint_attention_dim=2 * cfg.text_hidden, caption_projection_dim=cfg.dit_heads * cfg.dit_head_dim,
        pooled_projection_dim=2 * cfg.text_projection, pos_embed_max_size=max(16, 2 * latent // cfg.dit_patch),
        qk_norm="rms_norm",
    )
    encoders = [CLIPTextModelWithProjection(_clip_config(cfg, tokenizer, projection=True)) for _ in range(2)]
    return transformer, encoders


def make_scheduler(model: str):
    """The inference scheduler saved with each pipeline."""
    if model == "shapes":
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(
            num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
            prediction_type="v_prediction", steps_offset=1,
        )
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def encode_text(model: str, encoders, input_ids: torch.Tensor, t5_tokens: int = 256):
    """Text conditioning exactly as the pipelines compute it.

    ``input_ids: (B, 77)``. ``shapes``: returns ``(prompt_embeds (B, 77, D), None)``.
    ``shapes-dit``: ``(prompt_embeds (B, 77 + t5_tokens, J), pooled (B, 2 P))`` with ``J`` the transformer's
    ``joint_attention_dim`` (= 2 D here) and ``P`` each encoder's projection size.
    """
    if model == "shapes":
        return encoders[0](input_ids)[0], None
    hidden, pooled = [], []
    for enc in encoders:
        out = enc(input_ids, output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2])
    clip = torch.cat(hidden, dim=-1)
    zeros = clip.new_zeros(clip.shape[0], t5_tokens, clip.shape[-1])
    return torch.cat([clip, zeros], dim=-2), torch.cat(pooled, dim=-1)


class RepeatedLastTokenProcessor:
    """SD3 joint attention in which the last text token stands for ``copies`` identical tokens.

    Without T5 the SD3 pipeline appends ``max_sequence_length`` (256) all-zero tokens to the text. They enter
    every block identical and stay identical (every operation on them is per-token and they all see the same
    keys), so attention over them equals attention over one of them with ``log(copies)`` added to its logit.
    Training with one such token and this processor is therefore the same function as the stock pipeline with
    256, at a third of the cost. Mirrors diffusers' ``JointAttnProcessor2_0`` otherwise.
    ``hidden_states: (B, S_img, C)``, ``encoder_hidden_states: (B, S_txt, C)``.
    """

    def __init__(self, copies: int):
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):  # (B, S, H * D) -> (B, H, S, D)
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        bias = None
        if encoder_hidden_states is not None:
            cq = split(attn.add_q_proj(encoder_hidden_states))
            ck = split(attn.add_k_proj(encoder_hidden_states))
            cv = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            bias = q.new_zeros(1, 1, 1, k.shape[2])
            bias[..., -1] = self.log_copies
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, context) if encoder_hidden_states is not None else out


def _collapse_pad(cfg: TrainConfig, denoiser) -> int:
    """Install ``RepeatedLastTokenProcessor`` for SD3 training; returns the number of zero tokens to feed."""
    if cfg.model != "shapes-dit" or not cfg.dit_collapse_pad or cfg.dit_t5_tokens <= 1:
        return cfg.dit_t5_tokens
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    procs = denoiser.attn_processors
    unknown = {type(p).__name__ for p in procs.values() if not isinstance(p, JointAttnProcessor2_0)}
    if unknown:
        return cfg.dit_t5_tokens  # e.g. dual-attention layers: keep the exact, uncollapsed sequence
    denoiser.set_attn_processor(RepeatedLastTokenProcessor(cfg.dit_t5_tokens))
    return 1


def _restore_processors(module) -> None:
    if any(isinstance(p, RepeatedLastTokenProcessor) for p in module.attn_processors.values()):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        module.set_attn_processor(JointAttnProcessor2_0())


# ----------------------------------------------------------------------------------------------------------
# training loops


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batch_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """The generator of one batch: a function of (seed, phase, step) only, so resuming redraws the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 2 + (0 if phase == "vae" else 1))


def _save_state(path: Path, state: dict) -> None:
    # Written beside the checkpoint and renamed over it: a full disk or an interrupted run leaves the last good
    # checkpoint in place (and no partial file).
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@torch.no_grad()
def _ema_update(ema_params, params, decay: float) -> None:
    for e, p in zip(ema_params, params):
        e.lerp_(p.detach(), 1 - decay)


@torch.no_grad()
def latent_stats(vae, images_u8: torch.Tensor, device, n: int = 2048) -> tuple[float, float]:
    """Mean and standard deviation of the VAE's latent means over ``n`` dataset images."""
    vae.eval()
    zs = []
    for i in range(0, min(n, len(images_u8)), 256):
        zs.append(vae.encode(_to_unit(images_u8[i : i + 256]).to(device)).latent_dist.mean.float().cpu())
    z = torch.cat(zs)
    return float(z.mean()), float(z.std())


@torch.no_grad()
def encode_dataset(vae, images_u8: torch.Tensor, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of every image, computed once: ``mean, std: float (N, 4, h, w)`` on the CPU."""
    vae.eval()
    means, stds = [], []
    for i in range(0, len(images_u8), batch):
        dist = vae.encode(_to_unit(images_u8[i : i + batch]).to(device)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def _cached_latents(cfg, vae, images_u8, device, ckpt: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_dataset`` once per training folder: the posterior is kept in ``latents.pt`` beside the checkpoint
    (float16, keyed by the dataset and VAE weights), so a resumed run does not encode the dataset again."""
    import hashlib

    key = hashlib.sha256()
    key.update(json.dumps([cfg.seed, cfg.dataset_size, cfg.image_size, list(cfg.objects_p)]).encode())
    for name, value in sorted(vae.state_dict().items()):
        key.update(name.encode())
        key.update(value.detach().float().cpu().numpy().tobytes())
    digest = key.hexdigest()
    path = ckpt.with_name("latents.pt") if ckpt is not None else None
    if path is not None and path.exists():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: encode again
            cached = {}
        if cached.get("key") == digest:
            return cached["mean"].float(), cached["std"].float()
    mean, std = encode_dataset(vae, images_u8, device)
    if path is not None:
        _save_state(path, {"key": digest, "mean": mean.half(), "std": std.half()})
        mean, std = mean.half().float(), std.half().float()  # identical whether encoded now or read back
    return mean, std


def _load_weights_from_pipeline(cfg: TrainConfig, folder: str, denoiser, encoders) -> None:
    """Load a saved pipeline's denoiser and text encoder(s) into freshly built modules of the same shape."""
    from diffusers import DiffusionPipeline

    from ..models import _absent_components

    try:
        # An SD3-format folder saves its unused T5 slot as absent: pass it as None, as attnctl.load does.
        pipe = DiffusionPipeline.from_pretrained(folder, **_absent_components(Path(folder)))
    except Exception as exc:
        raise ShapesError(f"init_from={folder!r}: cannot load a pipeline from it ({exc})") from exc
    source = pipe.unet if cfg.model == "shapes" else pipe.transformer
    names = ["text_encoder"] if cfg.model == "shapes" else ["text_encoder", "text_encoder_2"]
    try:
        denoiser.load_state_dict(source.state_dict())
        for enc, name in zip(encoders, names):
            enc.load_state_dict(getattr(pipe, name).state_dict())
    except RuntimeError as exc:
        raise ShapesError(f"init_from={folder!r}: its weights do not fit this configuration's architecture "
                          f"(check unet_channels, unet_cross_all_levels, text_* and dit_* options): {exc}") from exc


def train_vae(cfg: TrainConfig, vae, images_u8, device, state: dict, ckpt: Path | None, progress: bool) -> None:
    """Train ``vae`` on ``images_u8: uint8 (N, 3, H, W)`` for ``cfg.vae_steps`` (resuming from ``state``)."""
    from tqdm.auto import tqdm

    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if "vae_opt" in state:
        opt.load_state_dict(state["vae_opt"])
    start = state.get("vae_step", 0)
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", disable=not progress, initial=start, total=cfg.vae_steps,
               mininterval=5)
    t0, running = time.time(), None
    for step in bar:
        g = _batch_generator(cfg.seed, "vae", step)
        idx = torch.randint(len(images_u8), (cfg.vae_batch,), generator=g)
        x = _to_unit(images_u8[idx]).to(device)
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(step, cfg.vae_steps, min(cfg.warmup, cfg.vae_steps // 10 + 1))
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = mse.item() if running is None else 0.98 * running + 0.02 * mse.item()
        bar.set_postfix(mse=f"{running:.4f}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.vae_steps:
            print(f"[vae] step {done}/{cfg.vae_steps} mse {running:.5f} {time.time() - t0:.0f}s", flush=True)
            state.setdefault("vae_history", []).append((done, running))
        if ckpt is not None and (done % cfg.checkpoint_every == 0 or done == cfg.vae_steps):
            state.update(vae=vae.state_dict(), vae_opt=opt.state_dict(), vae_step=done)
            state["elapsed_vae"] = state.get("elapsed_vae", 0.0) + time.time() - t0
            t0 = time.time()
            _save_state(ckpt, state)
    state.update(vae=vae.state_dict(), vae_step=cfg.vae_steps)
    state.pop("vae_opt", None)
    vae.eval()


def _denoiser_loss(cfg, denoiser, encoders, latents, input_ids, g, device, noise_scheduler, t5_tokens):
    """One training loss. ``latents: (B, 4, h, w)`` already scaled (and shifted), ``input_ids: (B, 77)``."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=g).to(device)
    embeds, pooled = encode_text(cfg.model, encoders, input_ids, t5_tokens)
    if cfg.model == "shapes":
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=g).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = noise_scheduler.get_velocity(latents, noise, t)
        pred = denoiser(noisy, t, encoder_hidden_states=embeds).sample
    else:
        # Rectified flow: x_t = (1 - s) x_0 + s noise, target noise - x_0; s ~ logit-normal(0, 1) (SD3 paper, 5.1).
        s = torch.sigmoid(torch.randn((b,), generator=g)).to(device)
        noisy = (1 - s[:, None, None, None]) * latents + s[:, None, None, None] * noise
        target = noise - latents
        pred = denoiser(hidden_states=noisy, timestep=s * 1000, encoder_hidden_states=embeds,
                        pooled_projections=pooled).sample
    return F.mse_loss(pred.float(), target.float())


def train_denoiser(cfg, vae, denoiser, encoders, images_u8, ids, empty_ids, device, state, ckpt, progress):
    """Train the denoiser and text encoders jointly; keeps EMA copies in ``state``."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear", prediction_type="v_prediction")
    t5_tokens = _collapse_pad(cfg, denoiser)
    modules = [denoiser, *encoders]
    if cfg.init_from and "denoiser" not in state:
        _load_weights_from_pipeline(cfg, cfg.init_from, denoiser, encoders)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema_modules = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
    if "denoiser" in state:
        denoiser.load_state_dict(state["denoiser"])
        for enc, sd in zip(encoders, state["encoders"]):
            enc.load_state_dict(sd)
        for m, sd in zip(ema_modules, state["ema"]):
            m.load_state_dict(sd)
        opt.load_state_dict(state["opt"])
    ema_params = [p for m in ema_modules for p in m.parameters()]
    shift, scale = state["latent_shift"], state["latent_scale"]
    for m in modules:
        m.train()
    vae.eval().requires_grad_(False)
    latent_mean, latent_std = _cached_latents(cfg, vae, images_u8, device, ckpt)
    start = state.get("step", 0)
    bar = tqdm(range(start, cfg.steps), desc=cfg.model, disable=not progress, initial=start, total=cfg.steps,
               mininterval=5)
    t0, running = time.time(), None
    for step in bar:
        g = _batch_generator(cfg.seed, "denoiser", step)
        idx = torch.randint(len(images_u8), (cfg.batch,), generator=g)
        drop = torch.rand((cfg.batch,), generator=g) < cfg.caption_dropout
        batch_ids = torch.where(drop[:, None], empty_ids[None, :], ids[idx]).to(device)
        with torch.no_grad():
            mean, std = latent_mean[idx].to(device), latent_std[idx].to(device)
            latents = (mean + std * torch.randn(mean.shape, generator=g).to(device) - shift) * scale
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup)
        loss = _denoiser_loss(cfg, denoiser, encoders, latents, batch_ids, g, device, noise_scheduler, t5_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema_params, params, cfg.ema if step >= cfg.warmup else 0.0)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            print(f"[{cfg.model}] step {done}/{cfg.steps} loss {running:.5f} {time.time() - t0:.0f}s", flush=True)
            state.setdefault("history", []).append((done, running))
        if ckpt is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            state.update(
                denoiser=denoiser.state_dict(), encoders=[e.state_dict() for e in encoders],
                ema=[m.state_dict() for m in ema_modules], opt=opt.state_dict(), step=done,
            )
            state["elapsed"] = state.get("elapsed", 0.0) + time.time() - t0
            t0 = time.time()
            _save_state(ckpt, state)
    state.update(denoiser=denoiser.state_dict(), encoders=[e.state_dict() for e in encoders],
                 ema=[m.state_dict() for m in ema_modules], step=cfg.steps)
    for m in (denoiser, ema_modules[0]):
        _restore_processors(m)
    return ema_modules


# ----------------------------------------------------------------------------------------------------------
# pipelines


def assemble_pipeline(model: str, vae, denoiser, encoders, tokenizer):
    """A stock ``StableDiffusionPipeline`` / ``StableDiffusion3Pipeline`` from trained components."""
    scheduler = make_scheduler(model)
    if model == "shapes":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=denoiser, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=denoiser, vae=vae, scheduler=scheduler, text_encoder=encoders[0], tokenizer=tokenizer,
        text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
        image_encoder=None, feature_extractor=None,
    )


def save_pipeline(pipe, folder: str | os.PathLike, card: str | None = None, dtype=torch.float32) -> Path:
    """Write ``pipe`` as a complete diffusers folder (safetensors) plus an optional ``README.md`` card."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def _vae_with_stats(vae, model: str, mean: float, std: float):
    """Copy of ``vae`` whose config carries the latent scaling (SD) or shift and scaling (SD3)."""
    vae = copy.deepcopy(vae)
    if model == "shapes":
        vae.register_to_config(scaling_factor=1.0 / std)
    else:
        vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    return vae


def _load_vae(path: str):
    from diffusers import AutoencoderKL

    p = Path(path)
    if (p / "state.pt").exists():
        state = torch.load(p / "state.pt", map_location="cpu", weights_only=False)
        cfg = TrainConfig(**{**state["config"], "vae_channels": tuple(state["config"]["vae_channels"])})
        vae = build_vae(cfg)
        vae.load_state_dict(state["vae"])
        return vae
    if (p / "vae").exists():
        p = p / "vae"
    return AutoencoderKL.from_pretrained(p)


def train(
    model_name: str = "shapes",
    out_dir: str | os.PathLike = "shapes-train",
    steps: int | None = None,
    resume: bool = True,
    device: str = "auto",
    config: TrainConfig | None = None,
    progress: bool = True,
    **overrides,
) -> Path:
    """Train ``model_name`` (``"shapes"`` or ``"shapes-dit"``) and write its pipeline to ``out_dir/pipeline``.

    ``out_dir/state.pt`` is the resumable checkpoint (``resume=False`` starts afresh). ``steps`` overrides the
    denoiser's step count; other ``TrainConfig`` fields may be passed as keyword overrides. Returns the pipeline
    folder, which ``StableDiffusionPipeline.from_pretrained`` / ``StableDiffusion3Pipeline.from_pretrained``
    load offline.
    """
    cfg = config if config is not None else default_config(model_name)
    if config is not None and config.model != model_name:
        raise ShapesError(f"config is for {config.model!r} but model_name is {model_name!r}")
    if steps is not None:
        overrides["steps"] = steps
    if overrides:
        unknown = set(overrides) - set(asdict(cfg))
        if unknown:
            raise ShapesError(f"unknown training option(s) {sorted(unknown)}; allowed: {sorted(asdict(cfg))}")
        cfg = replace(cfg, **overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = _device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "state.pt"
    state: dict = {}
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        saved = state.get("config", {})
        if saved.get("model") != cfg.model:
            raise ShapesError(f"checkpoint {ckpt} is for {saved.get('model')!r}, not {cfg.model!r}; "
                              "use another out_dir or resume=False")
        print(f"resuming from {ckpt}: vae step {state.get('vae_step', 0)}, step {state.get('step', 0)}", flush=True)
    state["config"] = asdict(cfg)
    torch.manual_seed(cfg.seed)

    t_render = time.time()
    images_u8, captions = render_dataset(cfg, progress)
    print(f"rendered {len(captions)} images in {time.time() - t_render:.0f}s", flush=True)
    tokenizer = build_tokenizer()
    ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]

    if cfg.vae_from:
        vae = _load_vae(cfg.vae_from).to(dev)
        state["vae_step"] = -1
    else:
        vae = build_vae(cfg)
        if "vae" in state:
            vae.load_state_dict(state["vae"])
        vae.to(dev)
        if state.get("vae_step", 0) < cfg.vae_steps:
            train_vae(cfg, vae, images_u8, dev, state, ckpt, progress)
    if "latent_shift" not in state:
        mean, std = latent_stats(vae, images_u8, dev)
        state["latent_mean"], state["latent_std"] = mean, std
        # SD pipelines only scale latents; SD3 pipelines shift and scale.
        state["latent_shift"] = 0.0 if cfg.model == "shapes" else mean
        state["latent_scale"] = 1.0 / std
        _save_state(ckpt, state)

    denoiser, encoders = build_denoiser(cfg, tokenizer)
    denoiser.to(dev)
    for e in encoders:
        e.to(dev)
    ema_modules = train_denoiser(cfg, vae, denoiser, encoders, images_u8, ids, empty_ids, dev, state, ckpt, progress)
    _save_state(ckpt, state)

    return export_pipeline(out, out / "pipeline", state=state, device=str(dev))


def export_pipeline(out_dir: str | os.PathLike, folder: str | os.PathLike | None = None, state: dict | None = None,
                    device: str = "cpu") -> Path:
    """Write the pipeline (EMA weights) of the checkpoint in ``out_dir`` to ``folder`` (default
    ``out_dir/pipeline``), also mid-run, plus ``out_dir/summary.json``. Returns the folder."""
    out = Path(out_dir)
    if state is None:
        if not (out / "state.pt").exists():
            raise ShapesError(f"no checkpoint at {out / 'state.pt'}; train first")
        state = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
    if "ema" not in state:
        raise ShapesError(f"checkpoint {out / 'state.pt'} has no denoiser weights yet (still in the VAE phase)")
    raw = dict(state["config"])
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    tokenizer = build_tokenizer()
    vae = _load_vae(cfg.vae_from) if cfg.vae_from else build_vae(cfg)
    if not cfg.vae_from:
        vae.load_state_dict(state["vae"])
    if (out / "decoder.pt").exists():  # a decoder fine-tuned on the frozen encoder's latents
        vae.load_state_dict(torch.load(out / "decoder.pt", map_location="cpu", weights_only=False)["decoder"],
                            strict=False)
    denoiser, encoders = build_denoiser(cfg, tokenizer)
    denoiser.load_state_dict(state["ema"][0])
    for enc, sd in zip(encoders, state["ema"][1:]):
        enc.load_state_dict(sd)
    final_vae = _vae_with_stats(vae, cfg.model, state["latent_mean"], state["latent_std"])
    pipe = assemble_pipeline(cfg.model, final_vae.eval(), denoiser.eval(), [e.eval() for e in encoders], tokenizer)
    folder = save_pipeline(pipe, folder if folder is not None else out / "pipeline")
    summary = {
        "config": asdict(cfg), "vae_step": state.get("vae_step"), "step": state.get("step"),
        "vae_seconds": state.get("elapsed_vae"), "denoiser_seconds": state.get("elapsed"),
        "latent_mean": state["latent_mean"], "latent_std": state["latent_std"], "device": device,
        "parameters": {
            "vae": sum(p.numel() for p in final_vae.parameters()),
            "denoiser": sum(p.numel() for p in denoiser.parameters()),
            "text": sum(p.numel() for e in encoders for p in e.parameters()),
        },
        "vae_history": state.get("vae_history"), "history": state.get("history"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return folder


def _decoder_keys(name: str) -> bool:
    return name.startswith("decoder.") or name.startswith("post_quant_conv.")


def finetune_decoder(out_dir: str | os.PathLike, steps: int = 1000, lr: float = 2e-4, batch: int | None = None,
                     foreground_weight: float = 10.0, progress: bool = True) -> Path:
    """Fine-tune only the VAE decoder of the checkpoint in ``out_dir`` (the encoder, hence the latent space
    the denoiser learns, stays fixed), with object pixels weighted ``foreground_weight`` times the background:
    small stars are a few pixels and a plain MSE lets the decoder round them into blobs. Safe to run while the
    denoiser trains. Writes ``out_dir/decoder.pt`` (resumable); ``export_pipeline`` uses it when present.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})
    batch = batch or cfg.vae_batch
    vae = build_vae(cfg)
    vae.load_state_dict(state["vae"])
    path = out / "decoder.pt"
    dec_state = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else {"step": 0}
    if "decoder" in dec_state:
        vae.load_state_dict(dec_state["decoder"], strict=False)
    params = [p for n, p in vae.named_parameters() if _decoder_keys(n)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if "opt" in dec_state:
        opt.load_state_dict(dec_state["opt"])
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vae.train()
    images_u8, _ = render_dataset(cfg, progress=False)
    background = images_u8[:, :, 0, 0].float().median(0).values  # (3,): the dataset's background
    start = dec_state["step"]
    for step in tqdm(range(start, steps), desc="decoder", disable=not progress, initial=start, total=steps,
                     mininterval=5):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 2 + 7)
        idx = torch.randint(len(images_u8), (batch,), generator=g)
        x = _to_unit(images_u8[idx])
        fg = (images_u8[idx].float() - background[None, :, None, None]).abs().amax(1, keepdim=True) > 8
        weight = 1.0 + (foreground_weight - 1.0) * fg.float()
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, min(50, steps // 10 + 1))
        loss = (weight * (vae.decode(z).sample - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % 50 == 0 or done == steps:
            print(f"[decoder] step {done}/{steps} weighted mse {loss.item():.5f}", flush=True)
            dec_state = {"decoder": {n: v for n, v in vae.state_dict().items() if _decoder_keys(n)},
                         "opt": opt.state_dict(), "step": done}
            _save_state(path, dec_state)
    return path
