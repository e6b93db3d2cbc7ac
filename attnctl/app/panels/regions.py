"""Regions tab: boxes bound to phrases, drawn on a canvas or typed as numbers, for the ``regions`` control.

Shown once a ``regions`` control is registered. The control's options schema is read, not assumed: the panel
looks for its list of regions (items with a phrase-like and a box-like key) and edits that list as boxes; every
other option comes from the generated form. Boxes are fractions of width and height, ``x0, y0, x1, y1``.
Drawing uses the ``gradio-image-annotation`` component when it is installed; typed lines always work
(``red circle: 0, 0, 0.5, 0.5``, one region per line), and the canvas writes those lines.
"""

from __future__ import annotations

from typing import Any

from ...errors import RecipeError
from .base import SchemaPanel

PHRASE_KEYS = ("phrase", "prompt", "text", "word", "label")
BOX_KEYS = ("box", "bbox", "rect")
CANVAS = 256  # pixels of the drawing canvas (boxes are stored as fractions)


def region_keys(options_model) -> tuple[str, str, str] | None:
    """(list field, phrase key, box key) of the options' region list, or None when there is none."""
    schema = options_model.model_json_schema()
    defs = schema.get("$defs", {})
    for name, prop in schema.get("properties", {}).items():
        for variant in [prop] + prop.get("anyOf", []):
            items = variant.get("items", {}) if variant.get("type") == "array" else {}
            if "$ref" in items:
                items = defs.get(items["$ref"].rsplit("/", 1)[-1], {})
            keys = items.get("properties", {})
            phrase = next((k for k in PHRASE_KEYS if k in keys), None)
            box = next((k for k in BOX_KEYS if k in keys), None)
            if phrase and box:
                return name, phrase, box
    return None


def parse_lines(text: str) -> list[tuple[str, list[float]]]:
    """``phrase: x0, y0, x1, y1`` lines -> [(phrase, box)]; range checks are the control's job."""
    regions = []
    for number, line in enumerate((text or "").splitlines(), 1):
        if not line.strip():
            continue
        phrase, sep, numbers = line.rpartition(":")
        try:
            box = [float(v) for v in numbers.replace(" ", "").split(",")]
        except ValueError:
            box = []
        if not sep or not phrase.strip() or len(box) != 4:
            raise RecipeError(f"regions line {number} {line.strip()!r}: write `phrase: x0, y0, x1, y1` with "
                              "fractions of the image, e.g. `red circle: 0, 0, 0.5, 0.5`")
        regions.append((phrase.strip(), box))
    return regions


def format_lines(regions: list[tuple[str, list[float]]]) -> str:
    return "\n".join(f"{phrase}: " + ", ".join(f"{v:g}" for v in box) for phrase, box in regions)


class RegionsPanel(SchemaPanel):
    def __init__(self):
        super().__init__("regions", tab="Regions", title="Regions", order=20, open=True)

    @property
    def keys(self):
        from ...controls import control_class

        return region_keys(control_class("regions").Options)

    @property
    def fields(self):
        keys = self.keys
        return [f for f in super().fields if keys is None or f.path[0] != keys[0]]

    def build(self, ctx) -> dict[str, Any]:
        inputs = super().build(ctx)
        if self.keys is None:
            return inputs
        import gradio as gr

        inputs["boxes"] = gr.Textbox("", label="Regions: one per line, `phrase: x0, y0, x1, y1` (fractions)",
                                     lines=3, placeholder="red circle: 0, 0, 0.5, 0.5", elem_id="regions-boxes")
        try:
            from gradio_image_annotation import image_annotator
        except ImportError:
            return inputs
        from PIL import Image

        blank = Image.new("RGB", (CANVAS, CANVAS), "white")
        canvas = image_annotator({"image": blank, "boxes": []}, label="Draw regions (label each box with its "
                                 "phrase)", image_type="pil", sources=[], use_default_label=False,
                                 elem_id="regions-canvas")

        def to_lines(value):
            if not value:
                return gr.update()
            width, height = value["image"].size if hasattr(value["image"], "size") else (CANVAS, CANVAS)
            return format_lines([(b.get("label") or "?", [round(b["xmin"] / width, 3), round(b["ymin"] / height, 3),
                                  round(b["xmax"] / width, 3), round(b["ymax"] / height, 3)])
                                 for b in value.get("boxes", [])])

        canvas.change(to_lines, inputs=[canvas], outputs=[inputs["boxes"]], api_visibility="private")
        return inputs

    def options(self, values):
        options = super().options(values)
        keys = self.keys
        if options is None or keys is None:
            return options
        field, phrase, box = keys
        options[field] = [{phrase: p, box: b} for p, b in parse_lines(values.get("boxes", ""))]
        return options

    def fill(self, options):
        values = super().fill(options if not isinstance(options, dict) else
                              {k: v for k, v in options.items() if self.keys is None or k != self.keys[0]})
        if self.keys is not None:
            field, phrase, box = self.keys
            regions = (options or {}).get(field) or []
            values["boxes"] = format_lines([(r.get(phrase, ""), list(r.get(box) or [])) for r in regions])
        return values


PANEL = RegionsPanel()
