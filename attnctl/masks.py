"""Region geometry: boxes and mask images -> which image tokens of a layer's grid lie in each region.

A region is drawn on the image as a box ``(x0, y0, x1, y1)`` (fractions of width and height, origin at the
top left) or as a mask image (mode ``L`` or ``1``, any size with the image's aspect ratio). Every attention
layer sees the image as its own token grid (h, w): 64x64 and 32x32 and 16x16 in one UNet, a 2x2-patched
grid in FLUX, and non-square grids for non-square images. ``coverage`` gives the exact fraction of each
token's cell covered by the region (area averaging, for any ratio of sizes, no resampling filter); a token
belongs to the region when at least half of its cell is covered. A region too small to half-cover any token
at a coarse grid still gets the token(s) it covers most, so no layer ever sees an empty region.

``RegionGrids`` holds the regions of one control and caches the membership per grid:
``inside(h, w) -> (R, h*w) bool`` (row-major tokens, the order of every adapter's image span). That is the
structured per-token representation the regions control expands into attention masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import ControlError

MASK_MODES = ("L", "1")
ASPECT_TOLERANCE = 0.02  # relative difference of width/height ratios a mask image may have from the image


def _interval_overlap(n_cells: int, starts: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """Fraction of each of ``n_cells`` equal cells of [0, 1] covered by each interval.

    starts, stops: (P,) interval ends in [0, 1]. Returns (n_cells, P) float64, entry [i, p] = length of
    [starts[p], stops[p]] inside cell i, divided by the cell's length 1 / n_cells.
    """
    edges = torch.arange(n_cells + 1, dtype=torch.float64) / n_cells
    low = torch.maximum(edges[:-1, None], starts[None, :])
    high = torch.minimum(edges[1:, None], stops[None, :])
    return (high - low).clamp(min=0) * n_cells


def box_coverage(box: Sequence[float], h: int, w: int) -> torch.Tensor:
    """Covered fraction of each token cell of an (h, w) grid by ``box = (x0, y0, x1, y1)``: (h, w) float64."""
    x0, y0, x1, y1 = (float(v) for v in box)
    rows = _interval_overlap(h, torch.tensor([y0], dtype=torch.float64), torch.tensor([y1], dtype=torch.float64))
    cols = _interval_overlap(w, torch.tensor([x0], dtype=torch.float64), torch.tensor([x1], dtype=torch.float64))
    return rows[:, 0, None] * cols[None, :, 0]


def mask_coverage(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Area-average a mask ``(H, W)`` with values in [0, 1] onto an (h, w) token grid: (h, w) float64.

    Exact for any ratio of sizes (up or down, not only integer factors): token (i, j) gets the mean of the
    mask over its cell, pixels that straddle a cell edge counted by the fraction inside.
    """
    big_h, big_w = mask.shape
    pixel_rows = torch.arange(big_h + 1, dtype=torch.float64) / big_h
    pixel_cols = torch.arange(big_w + 1, dtype=torch.float64) / big_w
    rows = _interval_overlap(h, pixel_rows[:-1], pixel_rows[1:])  # (h, H): each row's weights sum to 1
    cols = _interval_overlap(w, pixel_cols[:-1], pixel_cols[1:])  # (w, W)
    return rows @ mask.to(torch.float64) @ cols.T


def membership(coverage: torch.Tensor) -> torch.Tensor:
    """Tokens in the region: covered at least half, else the most-covered token(s). (h, w) -> (h*w,) bool."""
    flat = coverage.flatten()
    inside = flat >= 0.5
    if not bool(inside.any()):
        best = float(flat.max())
        inside = flat >= best - 1e-9 if best > 0 else inside
    return inside


def load_mask(path: str | Path, field: str = "mask") -> torch.Tensor:
    """Read a mask image (mode L or 1) as (H, W) float32 in [0, 1]; ``ControlError`` naming the problem."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise ControlError(f"{field} = {str(path)!r}: no such file") from None
    except OSError as exc:
        raise ControlError(f"{field} = {str(path)!r}: not a readable image ({exc})") from None
    if image.mode not in MASK_MODES:
        raise ControlError(
            f"{field} = {str(path)!r}: image mode {image.mode!r}; allowed modes: {', '.join(MASK_MODES)} "
            "(white = inside the region). Convert it first, e.g. Image.open(p).convert('L').save(p)"
        )
    values = torch.tensor(list(image.convert("L").getdata()), dtype=torch.float32).reshape(image.height, image.width)
    values = values / 255.0
    if not bool((values >= 0.5).any()):
        raise ControlError(f"{field} = {str(path)!r}: the mask is empty (no pixel >= 128); a region needs area")
    return values


class RegionGrids:
    """The regions of one control on any token grid, cached per grid.

    ``shapes``: per region a box ``(x0, y0, x1, y1)`` or a mask tensor (H, W) in [0, 1].
    ``complement``: also add one last region = the tokens in no other region (the background).
    """

    def __init__(self, shapes: Sequence[Sequence[float] | torch.Tensor], complement: bool = False):
        self.shapes = list(shapes)
        self.complement = complement
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.shapes) + int(self.complement)

    def check_aspect(self, height: int, width: int) -> None:
        """Mask images must have the generated image's aspect ratio (boxes are fractions: any ratio works)."""
        for index, shape in enumerate(self.shapes):
            if not isinstance(shape, torch.Tensor):
                continue
            mask_h, mask_w = shape.shape
            ratio, wanted = mask_w / mask_h, width / height
            if abs(ratio - wanted) > ASPECT_TOLERANCE * wanted:
                raise ControlError(
                    f"regions.{index}.mask: the mask is {mask_w}x{mask_h} (width x height, ratio {ratio:.3f}) but "
                    f"the image's latent grid is {width}x{height} (ratio {wanted:.3f}); a mask is resized to every "
                    "layer's grid, never stretched: draw it at the image's aspect ratio (any size)"
                )

    def coverage(self, h: int, w: int) -> torch.Tensor:
        """(R, h, w) float64: covered fraction of each token cell, per region (no complement)."""
        return torch.stack([
            mask_coverage(s, h, w) if isinstance(s, torch.Tensor) else box_coverage(s, h, w) for s in self.shapes
        ])

    def inside(self, h: int, w: int) -> torch.Tensor:
        """(len(self), h*w) bool: which tokens of an (h, w) grid lie in each region. Cached per grid."""
        key = (h, w)
        if key not in self._cache:
            rows = [membership(c) for c in self.coverage(h, w)]
            if self.complement:
                rows.append(~torch.stack(rows).any(dim=0))
            self._cache[key] = torch.stack(rows)
        return self._cache[key]
