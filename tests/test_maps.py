"""Map capture recovers a known attention pattern on every family, at non-square sizes."""

import torch
from PIL import Image

from attnctl.controls.maps import Maps
from attnctl.engine import apply
from attnctl.heatmap import overlay


def _uniform_queries(pipe, family):
    """Zero every query projection: each query then attends uniformly to all keys of its call."""
    denoiser = pipe.unet if family in ("sd15", "sdxl") else pipe.transformer
    for module in denoiser.modules():
        for name in ("to_q", "add_q_proj"):
            layer = getattr(module, name, None)
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.zeros_(layer.weight)
                if layer.bias is not None:
                    torch.nn.init.zeros_(layer.bias)


def test_uniform_pattern_recovered(pipe, family, call_kwargs):
    _uniform_queries(pipe, family)
    control = Maps(words=["circle", "red circle"])
    with apply(pipe, control) as session:
        pipe(["a red circle", "a circle"] if False else "a red circle", **call_kwargs(height=32, width=48))
    run = session.last_run()
    keys = {"sd15": 77, "sdxl": 77}.get(family)
    maps = control.maps
    h, w = run["controls"]["maps"]["grid"]
    assert h * 3 == w * 2  # 32x48 pixels keep their aspect ratio on every grid
    assert maps["circle"].shape == (1, h, w)
    if keys is None:  # joint attention: queries spread over image + text keys of each call
        values = maps["circle"]
        assert torch.allclose(values, values.flatten()[0].expand_as(values), rtol=1e-4)
    else:
        torch.testing.assert_close(maps["circle"], torch.full_like(maps["circle"], 1 / keys))
    torch.testing.assert_close(maps["red circle"], 2 * maps["circle"])  # two tokens, same share each


def test_maps_differ_by_word_and_overlay_draws(pipe, family, call_kwargs):
    control = Maps(words=["red", "circle"], layers=None)
    with apply(pipe, control):
        pipe("a red circle", **call_kwargs())
    assert not torch.allclose(control.maps["red"], control.maps["circle"])
    picture = overlay(Image.new("RGB", (32, 32), "white"), control.maps["red"][0])
    assert picture.size == (32, 32) and picture.getextrema() != ((255, 255),) * 3
