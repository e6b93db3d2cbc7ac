"""Inspection helpers: the attention layers of a model with the token counts of a real call."""

from __future__ import annotations

import torch

from .controls.base import Control


class _Probe(Control):
    """Records the shape of every attention call once (no edits)."""

    name = "probe"

    def bind(self, session):
        self.seen: dict[str, dict] = {}
        return {site.name: None for site in session.sites}

    def on_attention(self, call):
        if call.site.name not in self.seen:
            n_image = call.image.stop - call.image.start
            self.seen[call.site.name] = {"queries": call.q.shape[2], "keys": call.k.shape[2],
                                         "grid": list(call.grid), "text": (call.text.stop - call.text.start)
                                         if call.text is not None else 0, "image": n_image}


def layer_table(model, *, height: int | None = None, width: int | None = None, device="auto") -> list[dict]:
    """One dict per attention layer: layer, kind, heads, head_dim, queries, keys, text, grid (h, w)."""
    from .engine import apply
    from .models import load
    from .testing import TINY_SIZE

    pipe = load(model, device=device) if isinstance(model, str) else model
    probe = _Probe()
    with apply(pipe, probe) as session:
        family = session.family
        if height is None or width is None:
            default = TINY_SIZE[family] if isinstance(model, str) and model.startswith("tiny:") else None
            if default is None:
                vae_factor = getattr(pipe, "vae_scale_factor", 8)
                denoiser = session.denoiser
                sample = getattr(denoiser.config, "sample_size", 64)
                default = int(sample) * vae_factor if family not in ("flux", "flux2", "chroma") else 1024
            height, width = height or default, width or default
        kwargs = dict(num_inference_steps=1, height=height, width=width, output_type="latent")
        if family in ("flux", "flux2", "chroma"):
            kwargs["max_sequence_length"] = 64 if isinstance(model, str) and model.startswith("tiny:") else 512
        with torch.no_grad():
            pipe(prompt="layers", **kwargs)
        sites = session.sites
    rows = []
    for site in sites:
        seen = probe.seen.get(site.name, {})
        rows.append({"layer": site.name, "kind": site.kind, "heads": site.heads, "head_dim": site.head_dim,
                     "queries": seen.get("queries"), "keys": seen.get("keys"), "text": seen.get("text"),
                     "grid": seen.get("grid")})
    return rows
