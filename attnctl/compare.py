"""Side-by-side runs: the same prompts and seeds without and with a recipe's controls.

``attnctl run RECIPE --compare`` (and the app's *Compare* box) generates every item twice: once as the recipe
says, once with no control at all (the *baseline*: same model, scheduler, steps, guidance, size, prompt and
seed). One sheet per sweep setting puts them in rows, ``baseline | controlled | diagnostics``: the diagnostics are
what each control reported for that image (``run.json`` has them in full) and, on the embedded ShapesWorld
models, what the ShapesBench detector reads in both images, so the sheet says in words whether the control
changed what was drawn.

A baseline depends on everything but the controls, so a sweep over control options generates it once per
(prompt, seed) and every setting's sheet reuses it. A control that generates its item itself may say what its
baseline is: ``baseline_prompt(prompt)`` (an edit's baseline is its target prompt generated from the same seed,
"just regenerate with the new prompt"). An item of several prompts (interpolation) gets the plain image of each
prompt side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import RecipeError

SHAPES_MODELS = ("shapes", "shapes-dit")  # models whose images the ShapesBench detector reads
_CELL = 128
_TEXT_W = 300
_LINE_H = 11


def check_comparable(recipe, where: str = "recipe") -> None:
    """A comparison needs something to compare: at least one control in every setting."""
    for setting in recipe.settings():
        sub = recipe.at(setting) if setting else recipe
        if not sub.controls:
            at = f" (sweep setting {setting})" if setting else ""
            raise RecipeError(f"{where}{at}: --compare puts the baseline beside the recipe's controls, but "
                              "controls: is empty; add a control (e.g. controls: {excite: {}}) or run without "
                              "--compare")


def baseline_key(recipe, prompt, seed: int) -> str:
    """What a baseline image depends on: the recipe without its controls and sweep, the prompt and the seed."""
    fields = recipe.model_dump(exclude={"controls", "sweep", "output", "save_maps", "prompt", "seeds"})
    return json.dumps([fields, prompt, seed], sort_keys=True, default=str)


def baseline_prompt(controls, prompt):
    """The prompt(s) of the baseline: a generating control may name another (an edit's target)."""
    for control in controls:
        if hasattr(control, "baseline_prompt"):
            return control.baseline_prompt(prompt)
    return prompt


def generate_baseline(pipe, prompt, kwargs: dict, seed: int):
    """The plain pipeline's image for ``prompt`` (or a strip of images for a list of prompts)."""
    import torch
    from PIL import Image

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    images = []
    for p in prompts:
        call = dict(kwargs, generator=torch.Generator("cpu").manual_seed(seed))
        images.append(pipe(prompt=p, **call).images[0])
    if len(images) == 1:
        return images[0]
    strip = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
    x = 0
    for im in images:
        strip.paste(im, (x, 0))
        x += im.width
    return strip


def detector_line(image, prompt) -> str | None:
    """What the ShapesBench detector reads in ``image`` against ``prompt``: ``"2/2 present"`` and each object's
    status, e.g. ``"1/2 present: blue square neglected"``. ``None`` for prompts it cannot score."""
    import numpy as np

    from .shapes.detect import detect
    from .shapes.validate import match

    if not isinstance(prompt, str):
        return None
    try:
        result = match(prompt, detect(np.asarray(image.convert("RGB"))))
    except Exception:  # a prompt outside the ShapesWorld grammar
        return None
    missing = [f"{c} {s} {st.replace('_', ' ')}" for (c, s), st in zip(result.expected, result.status)
               if st != "present"]
    head = f"{result.n_present}/{len(result.expected)} present"
    return head + (": " + ", ".join(missing) if missing else "")


def _short(value) -> str | None:
    """A one-line rendering of a diagnostic value, or None when it is too large to show on a sheet."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, bool, str)):
        text = str(value)
        return text if len(text) <= 48 else text[:45] + "..."
    if (isinstance(value, (list, tuple)) and len(value) > 6
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return f"{_short(value[0])} -> {_short(value[-1])} ({len(value)} values)"  # e.g. a loss per step
    if isinstance(value, (list, tuple)) and len(value) <= 6 and all(isinstance(v, (int, float, str)) for v in value):
        text = "[" + ", ".join(_short(v) or "?" for v in value) + "]"
        return text if len(text) <= 48 else None
    if isinstance(value, dict) and len(value) <= 4 and all(isinstance(v, (int, float, str)) for v in value.values()):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return None


def diagnostic_lines(diagnostics: dict, per_control: int = 8) -> list[str]:
    """At most ``per_control`` short ``control.key = value`` lines per control (scalars and short lists first)."""
    lines = []
    for control, info in diagnostics.items():
        if not isinstance(info, dict):
            text = _short(info)
            if text is not None:
                lines.append(f"{control}: {text}")
            continue
        shown = 0
        items = list(info.items())
        for key, value in list(items):
            # A per-image list holding this one image's record (e.g. excite's "images"): show its fields.
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
                items += [(f"{key}.{k}", v) for k, v in value[0].items()]
        for key, value in items:
            text = _short(value)
            if text is None:
                continue
            lines.append(f"{control}.{key} = {text}")
            shown += 1
            if shown >= per_control:
                break
    return lines


def _wrap(text: str, width: int) -> list[str]:
    out = []
    while len(text) > width:
        cut = text.rfind(" ", 0, width)
        cut = cut if cut > width // 2 else width
        out.append(text[:cut])
        text = "  " + text[cut:].lstrip()
    return out + [text]


def compare_sheet(folder: Path, entries: list[dict], title: str = ""):
    """One image: a header, then per item ``baseline | controlled | text`` (prompt, seed, detector, diagnostics)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    chars = _TEXT_W // 6
    rows = []
    for e in entries:
        if not e.get("file") or not e.get("baseline"):
            continue
        prompt = e["prompt"] if isinstance(e["prompt"], str) else " -> ".join(e["prompt"])
        target = (e.get("info") or {}).get("target_prompt")
        if target:  # an edit: the controlled image is the source prompt edited to the target
            prompt = f"{prompt} -> {target}"
        text = _wrap(f"{prompt} (seed {e['seed']})", chars)
        reads = e.get("detector")
        if reads:
            text += _wrap(f"detector, baseline: {reads['baseline']}", chars)
            text += _wrap(f"detector, controlled: {reads['controlled']}", chars)
        for line in diagnostic_lines(e.get("diagnostics", {})):
            text += _wrap(line, chars)
        base = Image.open(folder / e["baseline"]).convert("RGB")
        ctrl = Image.open(folder / e["file"]).convert("RGB")
        rows.append((base, ctrl, text))
    if not rows:
        raise RecipeError("no images to compare: every item failed or produced no image")

    def fit(img):
        scale = _CELL / img.height
        return img.resize((max(1, round(img.width * scale)), _CELL), Image.NEAREST if scale >= 1 else Image.LANCZOS)

    # Each column as wide as its widest image (an interpolation's controlled strip is wider than its baseline).
    base_w = max([_CELL] + [fit(r[0]).width for r in rows])
    ctrl_w = max([_CELL] + [fit(r[1]).width for r in rows])
    text_x = base_w + ctrl_w + 10
    header = 16 + (14 if title else 0)
    heights = [max(_CELL, len(text) * _LINE_H) + 6 for _, _, text in rows]
    sheet = Image.new("RGB", (text_x + _TEXT_W, header + sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 2
    if title:
        draw.text((4, y), title[: sheet.width // 6], fill="black", font=font)
        y += 14
    for x, label in ((4, "baseline (no control)"), (base_w + 6, "controlled"), (text_x, "diagnostics")):
        draw.text((x, y), label, fill=(90, 90, 90), font=font)
    y = header
    for (base, ctrl, text), h in zip(rows, heights):
        sheet.paste(fit(base), (0, y))
        sheet.paste(fit(ctrl), (base_w + 2, y))
        for i, line in enumerate(text):
            draw.text((text_x, y + i * _LINE_H), line, fill="black", font=font)
        y += h
        draw.line([(0, y - 3), (sheet.width, y - 3)], fill=(220, 220, 220))
    return sheet


def stack_sheets(sheets: list, gap: int = 8):
    """Sheets one above the other (a showcase of several recipes), left-aligned on white."""
    from PIL import Image

    width = max(s.width for s in sheets)
    out = Image.new("RGB", (width, sum(s.height for s in sheets) + gap * (len(sheets) - 1)), "white")
    y = 0
    for s in sheets:
        out.paste(s, (0, y))
        y += s.height + gap
    return out


_SHEET_MARK = "attnctl:sheet"


def writable_sheet_path(path: str | Path) -> Path:
    """``path`` if a sheet may be written there: nothing there yet, or a sheet attnctl wrote before (the PNG's
    text chunk says so). Anything else is the user's file and is never replaced."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise RecipeError(f"--sheet {path}: the sheet is a PNG; give a path ending in .png")
    if path.exists():
        try:
            with Image.open(path) as img:
                ours = _SHEET_MARK in getattr(img, "text", {})
        except Exception:
            ours = False
        if not ours:
            raise RecipeError(f"--sheet {path}: a file is there that attnctl did not write; it is left as it is. "
                              "Give another path or move that file")
    return path


def write_sheet(source: Path, dest: str | Path) -> Path:
    """Copy the sheet ``source`` to ``dest`` atomically, marked as attnctl's (so a later run may replace it)."""
    import os

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    dest = writable_sheet_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(_SHEET_MARK, f"written by attnctl run --sheet from {Path(source).parent.name}/{Path(source).name}")
    tmp = dest.with_name(dest.name + ".tmp")
    with Image.open(source) as img:
        img.save(tmp, format="PNG", pnginfo=info, optimize=True)
    os.replace(tmp, dest)
    return dest


__all__ = ["SHAPES_MODELS", "baseline_key", "baseline_prompt", "check_comparable", "compare_sheet",
           "detector_line", "diagnostic_lines", "generate_baseline", "stack_sheets", "writable_sheet_path",
           "write_sheet"]
