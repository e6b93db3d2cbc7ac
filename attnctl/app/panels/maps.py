"""Attention maps tab: the ``maps`` control (per-word heatmaps over the image, by layer group and step range).

The library draws the overlays (``attnctl.heatmap`` via ``run_recipe``); this panel only adds labels and one
check: the library records a word missing from a prompt as a diagnostic and carries on (right for batch runs),
while in the app a misspelt word should stop the request with the library's own ``TokenError`` message, which
shows how the prompt tokenises.
"""

from __future__ import annotations

from .base import SchemaPanel


class MapsPanel(SchemaPanel):
    def check(self, pipe, recipe) -> None:
        from ...adapters import adapter_for
        from ...errors import TokenError
        from ...tokens import find_phrase

        entries = recipe.controls.get("maps")
        if not entries:
            return
        segments = adapter_for(pipe).text_segments(pipe)
        for entry in entries if isinstance(entries, list) else [entries]:
            for prompt in recipe.prompts:
                for word in entry.get("words", []):
                    for segment in segments:
                        try:
                            find_phrase(segment.tokenizer, prompt, word, segment.max_length)
                        except TokenError as exc:
                            raise TokenError(f"attention maps: {exc}") from None


PANEL = MapsPanel("maps", tab="Attention maps", title="Attention maps", order=10, open=True, labels={
    "words": "Words (comma-separated words or phrases of the prompt)",
    "layers": "Layers (groups, single layers or heads; empty: every layer with text)",
    "window__start": "Step range: from (fraction of the schedule)",
    "window__stop": "Step range: to",
})
