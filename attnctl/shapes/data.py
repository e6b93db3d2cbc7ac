"""ShapesWorld: procedural scenes of 1-3 coloured shapes with captions and ground truth.

A scene is a list of non-overlapping objects (colour, shape, size, box) on a plain light background. Everything
is deterministic from a seed: scene ``i`` of ``make_dataset(n, seed)`` depends only on ``(seed, i)``, so a
larger dataset starts with the same scenes as a smaller one.

Rendering draws at 4x the requested size with PIL and downsamples with a box filter, which anti-aliases edges:
an edge pixel is an exact mixture of the object's colour and the background (the detector relies on that).

Captions always name the colour and shape of every object ("a red circle and a blue square"), sometimes with a
size or a position word ("a small green triangle on the left", "a blue star at the top").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..errors import AttnctlError, did_you_mean

# Palette: far apart in RGB and in hue, and each far from the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 20),
    "purple": (135, 50, 180),
    "orange": (245, 125, 25),
}
BACKGROUND: tuple[int, int, int] = (244, 242, 236)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
# Side of an object's (square) layout box as a fraction of the image side.
SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (0.19, 0.25), "large": (0.32, 0.40)}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")
_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
# Every word a caption can contain (give it to ``attnctl.tokenizers.build_clip_tokenizer``).
VOCAB: tuple[str, ...] = tuple(
    ["a", "and", "on", "the", "at", "in"] + list(SIZES) + list(POSITIONS) + list(COLOURS) + list(SHAPES)
)

STAR_INNER_RATIO = 0.45  # inner/outer radius of the 5-pointed star (fat enough to stay a star at 12 px)
_SUPERSAMPLE = 4
MAX_OBJECTS = 4  # the most objects a scene holds (v2 training data has 1-4; the suites ask for up to 4)


class ShapesError(AttnctlError):
    """Bad input to the ShapesWorld generator, detector or trainer."""


@dataclass(frozen=True)
class ShapeObject:
    """One object: ``box`` is its tight bounding box ``(x0, y0, x1, y1)`` as fractions of the image side."""

    colour: str
    shape: str
    box: tuple[float, float, float, float]
    size: str = "large"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def position(self) -> str:
        """The position word a caption would use: ``left``/``right``/``top``/``bottom``/``middle``."""
        cx, cy = self.centre
        dx, dy = cx - 0.5, cy - 0.5
        if max(abs(dx), abs(dy)) < 0.15:
            return "middle"
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"


@dataclass(frozen=True)
class Scene:
    """A ShapesWorld scene: objects (non-overlapping) on a background colour, plus its caption."""

    objects: tuple[ShapeObject, ...]
    caption: str = ""
    background: tuple[int, int, int] = BACKGROUND


def _check(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ShapesError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}{did_you_mean(value, allowed)}")


def _shape_points(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Polygon vertices (pixels) of ``shape`` centred at ``(cx, cy)`` whose tight box has width ``side``.

    ``None`` for shapes drawn as primitives (circle, square).
    """
    if shape == "triangle":
        h = side * math.sqrt(3) / 2  # equilateral
        return [(cx - side / 2, cy + h / 2), (cx + side / 2, cy + h / 2), (cx, cy - h / 2)]
    if shape == "star":
        # Outer radius r: tight width 2 r sin 72, height r (1 + cos 36). Centre the tight box on (cx, cy).
        r = side / (2 * math.sin(math.radians(72)))
        height = r * (1 + math.cos(math.radians(36)))
        oy = cy - height / 2 + r  # star centre so that the tight box is centred vertically
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * STAR_INNER_RATIO
            ang = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(ang), oy + rad * math.sin(ang)))
        return pts
    return None


def shape_extent(shape: str, side: float) -> tuple[float, float]:
    """(width, height) of the tight box of ``shape`` drawn with layout side ``side`` (any unit)."""
    if shape == "triangle":
        return side, side * math.sqrt(3) / 2
    if shape == "star":
        r = side / (2 * math.sin(math.radians(72)))
        return side, r * (1 + math.cos(math.radians(36)))
    return side, side


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` as a ``size x size`` RGB image (anti-aliased by 4x supersampling)."""
    if size < 16:
        raise ShapesError(f"image size must be at least 16 pixels, got {size}")
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _check("shape", obj.shape, SHAPES)
        _check("colour", obj.colour, COLOURS)
        colour = COLOURS[obj.colour]
        x0, y0, x1, y1 = (v * big for v in obj.box)
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            pts = _shape_points(obj.shape, (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0)
            draw.polygon(pts, fill=colour)
    return img.resize((size, size), Image.BOX)


def caption_for(objects, rng: np.random.Generator | None = None, style: str | None = None) -> str:
    """A caption naming colour and shape of every object.

    ``style``: ``"plain"`` ("a red circle and a blue square"), ``"size"`` ("a small red circle ..."),
    ``"position"`` ("a red circle on the left ...") or ``"both"``; drawn at random from ``rng`` when ``None``
    (plain 50%, size 20%, position 20%, both 10%). Three or more objects are listed with commas ("a red circle, a
    blue square and a green star") half the time when ``rng`` is given, else with "and" throughout.
    """
    styles = ("plain", "size", "position", "both")
    if style is None:
        if rng is None:
            style = "plain"
        else:
            style = styles[int(rng.choice(4, p=[0.5, 0.2, 0.2, 0.1]))]
    _check("caption style", style, styles)
    positions = [o.position for o in objects]
    # A position word is only informative when the objects' positions differ.
    use_position = style in ("position", "both") and len(set(positions)) == len(positions)
    use_size = style in ("size", "both")
    parts = []
    for obj, pos in zip(objects, positions):
        words = ["a"]
        if use_size:
            words.append(obj.size)
        words += [obj.colour, obj.shape]
        if use_position:
            words.append(_POSITION_PHRASE[pos])
        parts.append(" ".join(words))
    # Three or more objects: "a, b and c" (the suites' grammar) or "a and b and c", half each when drawn at random.
    if len(parts) >= 3 and rng is not None and rng.random() < 0.5:
        return ", ".join(parts[:-1]) + " and " + parts[-1]
    return " and ".join(parts)


def _boxes_apart(a, b, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_scene(
    rng: np.random.Generator,
    min_objects: int = 1,
    max_objects: int = 3,
    colours=tuple(COLOURS),
    shapes=SHAPES,
    margin: float = 0.04,
    gap: float = 0.05,
    caption_style: str | None = None,
) -> Scene:
    """Draw a random scene of ``min_objects..max_objects`` non-overlapping objects from ``rng``.

    Objects keep ``margin`` from the image border and ``gap`` between their boxes (fractions of the side).
    Colour+shape pairs within a scene are distinct, so a caption never names the same object twice.
    """
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ShapesError(
            f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}"
        )
    for c in colours:
        _check("colour", c, COLOURS)
    for s in shapes:
        _check("shape", s, SHAPES)
    n = int(rng.integers(min_objects, max_objects + 1))
    pairs = [(c, s) for c in colours for s in shapes]
    if n > len(pairs):
        raise ShapesError(f"cannot place {n} distinct objects from {len(pairs)} colour/shape pairs")
    chosen = rng.choice(len(pairs), size=n, replace=False)
    objects: list[ShapeObject] = []
    for idx in chosen:
        colour, shape = pairs[int(idx)]
        placed = None
        for attempt in range(60):
            # Fall back to small objects when large ones do not fit.
            size = "small" if attempt >= 30 else SIZES[int(rng.integers(2))]
            lo, hi = SIZE_RANGE[size]
            side = float(rng.uniform(lo, hi))
            w, h = shape_extent(shape, side)
            x0 = float(rng.uniform(margin, 1 - margin - w))
            y0 = float(rng.uniform(margin, 1 - margin - h))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_boxes_apart(box, o.box, gap) for o in objects):
                placed = ShapeObject(colour=colour, shape=shape, box=box, size=size)
                break
        if placed is None:
            continue  # rare: the canvas is full; keep the objects placed so far
        objects.append(placed)
    return Scene(objects=tuple(objects), caption=caption_for(objects, rng, caption_style))


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` in a dataset seeded with ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


def make_dataset(
    n: int, seed: int = 0, size: int = 64, min_objects: int = 1, max_objects: int = 3, **scene_kwargs
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Render ``n`` scenes deterministically from ``seed``.

    Returns ``images: uint8 (n, size, size, 3)``, ``captions: list[str]`` and ``scenes: list[Scene]``.
    """
    if n < 0:
        raise ShapesError(f"dataset size must be >= 0, got {n}")
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    scenes: list[Scene] = []
    for i in range(n):
        scene = sample_scene(scene_rng(seed, i), min_objects=min_objects, max_objects=max_objects, **scene_kwargs)
        images[i] = np.asarray(render(scene, size))
        captions.append(scene.caption)
        scenes.append(scene)
    return images, captions, scenes


def parse_caption(caption: str) -> list[dict]:
    """Objects named by a ShapesWorld caption: ``[{"colour", "shape", "size", "position"}, ...]``.

    Size and position are ``None`` when the caption does not give them. Raises ``ShapesError`` for a phrase
    without a known colour and shape.
    """
    objects = []
    for phrase in caption.lower().replace(",", " and ").split(" and "):
        words = phrase.split()
        if not words:
            continue
        colour = next((w for w in words if w in COLOURS), None)
        shape = next((w for w in words if w in SHAPES), None)
        if colour is None or shape is None:
            raise ShapesError(
                f"caption phrase {phrase.strip()!r} does not name a colour ({', '.join(COLOURS)}) "
                f"and a shape ({', '.join(SHAPES)})"
            )
        size = next((w for w in words if w in SIZES), None)
        position = next((w for w in words if w in POSITIONS), None)
        objects.append({"colour": colour, "shape": shape, "size": size, "position": position})
    return objects
