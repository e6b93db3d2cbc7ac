"""A rule-based detector of ShapesWorld objects: colour, shape and box from an RGB image.

1. Background: the median colour of the image border (robust to the tinted backgrounds of generated images).
2. Every pixel is explained as a mixture ``background + alpha (palette colour - background)``; it takes the
   palette colour with the smallest residual, and counts as that colour's foreground when ``alpha >= 0.5``
   and the residual is small. Anti-aliased edges are exactly such mixtures, so orange edges do not turn into
   yellow specks.
3. 4-connected components per colour (a plain flood fill, no SciPy); specks below ``min_pixels`` are dropped.
4. Shape from geometry: the fill of the bounding box (square 1.0, circle 0.785, triangle 0.5, star about
   0.45), the solidity (area over convex-hull area: about 0.6-0.7 for the star, 0.9 or more for the others)
   and the row where the object is widest (a triangle's base is at the bottom, a star's arms above centre).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .data import COLOURS, ShapesError

PALETTE_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in PALETTE_NAMES], dtype=np.float32)  # (C, 3)


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` as fractions ``(x0, y0, x1, y1)`` of the image side."""

    colour: str
    shape: str
    box: tuple[float, float, float, float]
    pixels: int
    fill: float = 0.0
    solidity: float = 0.0
    widest: float = 0.5
    corners: float = 0.0


def _as_array(image) -> np.ndarray:
    """PIL image or array (H, W, 3) uint8 / float in [0, 1] -> float32 (H, W, 3) in [0, 255]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ShapesError(f"expected an RGB image of shape (H, W, 3), got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if arr.max() <= 1.0 + 1e-6 and np.asarray(image).dtype != np.uint8:
        arr = arr * 255.0
    return arr


def estimate_background(img: np.ndarray, border: int = 1) -> np.ndarray:
    """Median colour (3,) of the ``border``-pixel frame of ``img: (H, W, 3)``."""
    frame = np.concatenate(
        [img[:border].reshape(-1, 3), img[-border:].reshape(-1, 3), img[:, :border].reshape(-1, 3),
         img[:, -border:].reshape(-1, 3)]
    )
    return np.median(frame, axis=0)


def classify_pixels(img: np.ndarray, background: np.ndarray, max_residual: float = 45.0):
    """Per-pixel palette index and coverage.

    ``img: (H, W, 3)`` in [0, 255]. Returns ``labels: int (H, W)`` (palette index, -1 for background or
    unexplained pixels) and ``alpha: float (H, W)``, the fraction of the pixel covered by that colour.
    """
    d = _PALETTE - background[None, :]  # (C, 3)
    x = img.reshape(-1, 3) - background[None, :]  # (P, 3)
    alpha = (x @ d.T) / np.maximum((d * d).sum(1), 1e-6)[None, :]  # (P, C)
    alpha_c = np.clip(alpha, 0.0, 1.0)
    resid = np.linalg.norm(x[:, None, :] - alpha_c[:, :, None] * d[None, :, :], axis=-1)  # (P, C)
    # Prefer the colour that explains the pixel; break near-ties towards the larger coverage.
    best = np.argmin(resid - 1e-3 * alpha_c, axis=1)
    rows = np.arange(len(best))
    a = alpha_c[rows, best]
    r = resid[rows, best]
    labels = np.where((a >= 0.5) & (r <= max_residual * np.maximum(a, 0.5)), best, -1)
    h, w = img.shape[:2]
    return labels.reshape(h, w), a.reshape(h, w)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean ``mask: (H, W)``: a list of ``(K, 2)`` arrays of (row, col)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue = deque([(r0, c0)])
        pts = []
        while queue:
            r, c = queue.popleft()
            pts.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        comps.append(np.array(pts))
    return comps


def _fill_holes(comp: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """``comp: (K, 2)`` pixels plus every pixel of its box not 4-connected to the box's outside."""
    box = np.zeros((r1 - r0 + 2, c1 - c0 + 2), dtype=bool)
    box[comp[:, 0] - r0 + 1, comp[:, 1] - c0 + 1] = True
    outside = connected_components(~box)
    free = np.ones_like(box)
    for part in outside:
        if (part == 0).any():  # touches the padding: truly outside (index 0 row or column)
            free[part[:, 0], part[:, 1]] = False
    filled = np.argwhere(free[1:-1, 1:-1]) + [r0, c0]
    return filled


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D ``points: (K, 2)`` (Andrew's monotone chain + shoelace)."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2:
                (x1, y1), (x2, y2) = out[-2], out[-1]
                if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                    out.pop()
                else:
                    break
            out.append(tuple(p))
        return out

    lower, upper = half(pts), half(pts[::-1])
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _corner_cover(comp: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> float:
    """Mean coverage of the four corner cells (each a quarter of the box side) of the box: square ~1, circle ~0.3."""
    box = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    box[comp[:, 0] - r0, comp[:, 1] - c0] = True
    h, w = box.shape
    ch, cw = max(1, h // 4), max(1, w // 4)
    cells = [box[:ch, :cw], box[:ch, -cw:], box[-ch:, :cw], box[-ch:, -cw:]]
    return float(np.mean([c.mean() for c in cells]))


def classify_shape(fill: float, solidity: float, widest: float = 0.5, corners: float | None = None) -> str:
    """Shape from the box fill ratio, the solidity and where the object is widest (0 top, 1 bottom).

    Measured on ground-truth renders and on VAE reconstructions (2nd-98th percentiles):
    square fill >= 0.88; circle fill 0.72-0.85, solidity >= 0.91; triangle widest >= 0.8 (its base),
    fill 0.51-0.64; star widest 0.3-0.5, solidity 0.57-0.86 (blurred small stars are the fullest), fill <= 0.74.
    ``corners`` (mean coverage of the box's corner cells) settles full but irregular objects.
    """
    if widest >= 0.7 and fill < 0.75:
        return "triangle"
    if fill >= 0.87:
        return "square"
    if solidity < 0.885 and fill < 0.78:
        return "star"
    if fill >= 0.78 and corners is not None:
        # A generated square with a bitten edge: its corners are still filled, a circle's are not.
        return "square" if corners >= 0.75 else "circle"
    return "circle" if fill >= 0.64 else "star"


def detect(image, min_pixels: int | None = None, max_residual: float = 45.0) -> list[Detection]:
    """Objects in an RGB ``image`` (PIL, or array ``(H, W, 3)`` uint8 or float in [0, 1]).

    ``min_pixels`` (default 0.4% of the image area) drops specks. Returns detections sorted by pixel count,
    largest first.
    """
    img = _as_array(image)
    h, w = img.shape[:2]
    if min_pixels is None:
        min_pixels = max(4, int(0.004 * h * w))
    background = estimate_background(img)
    labels, alpha = classify_pixels(img, background, max_residual)
    found = []
    for ci, name in enumerate(PALETTE_NAMES):
        mask = labels == ci
        if mask.sum() < min_pixels:
            continue
        for comp in connected_components(mask):
            if len(comp) < min_pixels:
                continue
            rows, cols = comp[:, 0], comp[:, 1]
            r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            # Fill holes: generated objects have light blotches inside (yellow most, being nearest the
            # background) that would otherwise read as concavities.
            comp = _fill_holes(comp, r0, r1, c0, c1)
            rows, cols = comp[:, 0], comp[:, 1]
            fill = float(len(comp)) / float((r1 - r0) * (c1 - c0))
            # Where the object is widest, from top (0) to bottom (1): a triangle at its base, a star at its arms.
            widths = np.bincount(rows - r0, minlength=r1 - r0)
            widest = float(np.mean(np.nonzero(widths >= 0.9 * widths.max())[0])) / max(1, r1 - r0 - 1)
            corner_fill = _corner_cover(comp, r0, r1, c0, c1)
            corners = np.concatenate([comp, comp + [0, 1], comp + [1, 0], comp + [1, 1]])
            hull = _hull_area(corners.astype(np.float64))
            solidity = float(len(comp)) / hull if hull > 0 else 1.0
            found.append(
                Detection(
                    colour=name, shape=classify_shape(fill, solidity, widest, corner_fill),
                    box=(c0 / w, r0 / h, c1 / w, r1 / h), pixels=int(len(comp)), fill=fill, solidity=solidity,
                    widest=widest, corners=corner_fill,
                )
            )
    return sorted(found, key=lambda d: -d.pixels)
