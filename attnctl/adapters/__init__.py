"""Architecture adapters: where attention lives in each family. One file per family, one registry line each."""

from __future__ import annotations

from ..errors import ModelError
from .base import KINDS, Adapter, Site, TextSegment
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .chroma import ChromaAdapter
from .qwenimage import QwenImageAdapter
from .sd3 import SD3Adapter
from .unet import SDXLAdapter, UNetAdapter
from .zimage import ZImageAdapter

# Registry: checked in order; the first adapter whose ``matches`` accepts the pipeline wins.
ADAPTERS: dict[str, type[Adapter]] = {
    "sdxl": SDXLAdapter,
    "sd15": UNetAdapter,
    "sd3": SD3Adapter,
    "flux": FluxAdapter,
    "flux2": Flux2Adapter,
    "chroma": ChromaAdapter,
    "qwenimage": QwenImageAdapter,
    "zimage": ZImageAdapter,
}

FAMILY_NAMES = {
    "sd15": "Stable Diffusion 1.x/2.x (UNet)",
    "sdxl": "Stable Diffusion XL (UNet)",
    "sd3": "Stable Diffusion 3 / 3.5 (MM-DiT)",
    "flux": "FLUX (MM-DiT)",
    "flux2": "FLUX.2 [dev] / [klein] (MM-DiT)",
    "chroma": "Chroma (FLUX-derived MM-DiT, T5 only)",
    "qwenimage": "Qwen-Image (MM-DiT)",
    "zimage": "Z-Image / Z-Image-Turbo (single-stream DiT)",
}


def adapter_for(pipe) -> Adapter:
    """The adapter for a loaded pipeline; ``ModelError`` naming the supported families otherwise."""
    for cls in ADAPTERS.values():
        if cls.matches(pipe):
            return cls()
    supported = "; ".join(FAMILY_NAMES.values())
    raise ModelError(f"{type(pipe).__name__} is not a supported pipeline. attnctl supports: {supported}")


def family_from_index(index: dict) -> str | None:
    """The family of a saved pipeline from its ``model_index.json`` contents (the first adapter whose
    ``matches_index`` accepts it, in ``ADAPTERS`` order), or None when no adapter recognises its denoiser."""
    for cls in ADAPTERS.values():
        if cls.matches_index(index):
            return cls.family
    return None


__all__ = ["ADAPTERS", "family_from_index", "FAMILY_NAMES", "KINDS", "Adapter", "Site", "TextSegment", "adapter_for"]
