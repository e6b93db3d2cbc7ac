"""Edit tab: change an image through its prompt with the ``edit`` control (inversion, attention injection,
local blend). Upload a real image (it is inverted under the source prompt) or leave it empty to edit the image
the source prompt generates; the target image, the source and the blend mask come back side by side.

The form is the control's generated one, with the ``image`` option as an upload widget instead of a text path.
Everything else (validation, inversion, the edit) is the library's.
"""

from __future__ import annotations

from typing import Any

from .base import SchemaPanel


class EditPanel(SchemaPanel):
    def __init__(self):
        super().__init__("edit", tab="Edit", title="Edit an image", order=30, open=True, hidden=("image",), labels={
            "target": "Target prompt (the Generate tab's prompt is the source prompt)",
            "kind": "Kind: swap words, refine (added words) or reweight",
        })

    @property
    def fields(self):
        first = ("target", "kind")  # what every edit needs, before the attention options
        fields = super().fields
        return sorted(fields, key=lambda f: first.index(f.path[0]) if f.path[0] in first else len(first))

    def build(self, ctx) -> dict[str, Any]:
        import gradio as gr

        gr.Markdown("Type the **source prompt** in the Generate tab (what the image shows) and the **target "
                    "prompt** here. Results: target, source and the local-blend mask, side by side.")
        upload = gr.Image(None, type="filepath", sources=["upload", "clipboard"], label="Source image (optional: "
                          "empty = edit the image the source prompt generates)", elem_id="edit-upload")
        inputs = super().build(ctx)
        # The recipe option is a file path: the upload writes it here (API clients pass a path on the server).
        inputs["image"] = gr.Textbox("", label="Source image file", elem_id="edit-image",
                                     placeholder="set by the upload above, or a path on the server")
        upload.change(lambda path: path or "", inputs=[upload], outputs=[inputs["image"]], api_visibility="private")
        return inputs

    def options(self, values: dict[str, Any]) -> dict | None:
        options = super().options(values)
        if options is not None and values.get("image"):
            options["image"] = str(values["image"])
        return options

    def fill(self, options) -> dict[str, Any]:
        values = super().fill(options)
        entry = options[0] if isinstance(options, list) and options else options
        values["image"] = (entry or {}).get("image") or ""
        return values


PANEL = EditPanel()
