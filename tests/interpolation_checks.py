"""One check of the ``interpolate`` control on a family's tiny pipeline, shared by the family test files."""

import torch

from attnctl.controls.interpolate import Interpolate
from attnctl.testing import tiny_call_kwargs

A, B = "a red circle", "a blue square"


def check_interpolation(pipe, family: str, frames: int = 5, steps: int = 3) -> None:
    """Uniform spacing: the anchor frames equal the plain generations of A and B (same seed); every frame's
    latent, projected on the line from A's to B's, moves monotonically from 0 to 1 (and distances to A grow, to
    B shrink); attention interpolation changes the in-between frames from the text-embedding-only baseline."""
    kwargs = tiny_call_kwargs(family, steps=steps)
    kwargs.pop("generator")
    result = Interpolate(prompts=[A, B], frames=frames, spacing="uniform").generate(pipe, seed=0, **kwargs)
    out = torch.stack(result.frames).double().flatten(1)
    for frame, prompt in ((0, A), (-1, B)):
        plain = pipe(prompt=prompt, **tiny_call_kwargs(family, steps=steps)).images[0].double().flatten()
        assert (out[frame] - plain).abs().max() <= 1e-4, (family, prompt)
    a, b = out[0], out[-1]
    t = ((out - a) @ (b - a)) / ((b - a) @ (b - a))
    assert bool((t[1:] > t[:-1]).all()) and 0 < float(t[1]) and float(t[-2]) < 1, t.tolist()
    to_a, to_b = (out - a).norm(dim=1), (out - b).norm(dim=1)
    assert bool((to_a[1:] > to_a[:-1]).all()) and bool((to_b[1:] < to_b[:-1]).all())
    naive = torch.stack(Interpolate(prompts=[A, B], frames=frames, spacing="uniform", mode="embedding").generate(
        pipe, seed=0, **kwargs).frames).double().flatten(1)
    # the attention interpolation acted on the cond rows (relative to the gap between the anchors)
    assert (naive[1:-1] - out[1:-1]).abs().max() > 1e-3 * (b - a).abs().max()
