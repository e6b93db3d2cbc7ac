"""Head search tab: run the library's HeadHunter search (``attnctl.hunt.hunt``) on the form's recipe.

Shown once ``attnctl.hunt`` exists (it arrives with the perturbation control). The search takes the recipe the
form describes (prompts, seeds, model, controls) and the search settings; its keyword arguments are matched to
``hunt``'s signature, and its result (the chosen heads, as a recipe snippet) is shown as YAML.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from .base import Panel


def hunt_function():
    try:
        return getattr(importlib.import_module("attnctl.hunt"), "hunt", None)
    except ImportError:
        return None


class HuntPanel(Panel):
    key = "hunt"
    tab = "Head search"
    title = "Head search"
    order = 30

    def available(self) -> bool:
        return hunt_function() is not None

    def build(self, ctx) -> dict[str, Any]:
        import gradio as gr

        gr.Markdown("Greedy head search (HeadHunter): scores candidate head sets on the prompts and seeds of the "
                    "Generate tab and keeps the best. Use the chosen heads in the perturbation control.")
        with gr.Row():
            self.rounds = gr.Number(3, precision=0, minimum=1, label="Rounds", elem_id="hunt-rounds")
            self.top_k = gr.Number(4, precision=0, minimum=1, label="Heads kept per round", elem_id="hunt-top-k")
            self.objective = gr.Textbox("", label="Objective (empty: the library's default)", elem_id="hunt-objective")
        self.button = gr.Button("Search heads", elem_id="hunt-run")
        self.result = gr.Code("", language="yaml", label="Chosen heads", elem_id="hunt-result")
        return {}

    def wire(self, ctx) -> None:
        import gradio as gr
        import yaml

        from ..jobs import validate
        from ..ui import guarded, recipe_from_form

        def on_hunt(rounds, top_k, objective, progress=gr.Progress(track_tqdm=True), **values):
            hunt = hunt_function()
            settings = {"rounds": int(rounds), "top_k": int(top_k), "objective": objective or None}
            accepted = inspect.signature(hunt).parameters
            kwargs = {k: v for k, v in settings.items() if k in accepted and v is not None}

            def search():
                recipe = validate(recipe_from_form(values, ctx.panels, ctx.default_model))
                with ctx.cache.use(recipe.model, recipe.device, recipe.dtype) as pipe:
                    if "pipe" in accepted:
                        kwargs["pipe"] = pipe
                    return hunt(recipe, **kwargs)

            found = guarded(search)
            if hasattr(found, "model_dump"):
                found = found.model_dump()
            return found if isinstance(found, str) else yaml.safe_dump(found, sort_keys=False)

        self.button.click(on_hunt, inputs=[self.rounds, self.top_k, self.objective], inputs_kwargs=dict(ctx.form),
                          outputs=[self.result], api_name="hunt", concurrency_id="generate")


PANEL = HuntPanel()
