"""Attention maps as pictures: a heatmap blended over the generated image."""

from __future__ import annotations

import torch
from PIL import Image, ImageOps


def heatmap(values: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """A (h, w) map -> an RGB heatmap of ``size`` (width, height), normalised to its own min..max."""
    values = values.detach().float().cpu()
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else torch.zeros_like(values)
    gray = Image.fromarray((scaled.numpy() * 255).astype("uint8"), mode="L").resize(size, Image.BILINEAR)
    return ImageOps.colorize(gray, black="#000004", mid="#b73779", white="#fcfdbf")


def overlay(image: Image.Image, values: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """``image`` with the heatmap of ``values`` (h, w) blended over it."""
    base = image.convert("RGB")
    return Image.blend(base, heatmap(values, base.size), alpha)
