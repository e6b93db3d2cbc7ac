"""Head search tab: run the library's HeadHunter search (``attnctl.hunt.hunt``) on the form's recipe.

The search takes the recipe the form describes (prompts, seeds, model, and the perturbation control: its layers
are the candidate heads, its scale/u/window/mode the guidance) and the search settings. The result is the
library's recipe snippet for the chosen heads, under comments with each round's choice and score.
"""

from __future__ import annotations

from typing import Any

from .base import Panel


def result_text(state) -> str:
    """A finished hunt (``attnctl.hunt.HuntState``) as YAML: the recipe snippet under a comment per round."""
    lines = [f"# baseline (no perturbation): {state.baseline:.4f}"]
    lines += [f"# round {i}: {', '.join(r['chosen'])} (score {r['best']:.4f}, {r['gain']:+.4f})"
              for i, r in enumerate(state.rounds, 1)]
    return "\n".join(lines) + "\n" + (state.snippet or "")


class HuntPanel(Panel):
    key = "hunt"
    tab = "Head search"
    title = "Head search"
    order = 30

    def build(self, ctx) -> dict[str, Any]:
        import gradio as gr

        gr.Markdown("Greedy head search (HeadHunter): scores candidate head sets on the prompts and seeds of the "
                    "Generate tab and keeps the best. Use the chosen heads in the perturbation control.")
        with gr.Row():
            self.rounds = gr.Number(3, precision=0, minimum=1, label="Rounds", elem_id="hunt-rounds")
            self.top_k = gr.Number(4, precision=0, minimum=1, label="Heads kept per round", elem_id="hunt-top-k")
            self.objective = gr.Textbox("", label="Objective (empty: shapes; or shapes-graded, clip:MODEL, pickscore)", elem_id="hunt-objective")
        self.button = gr.Button("Search heads", elem_id="hunt-run")
        self.result = gr.Code("", language="yaml", label="Chosen heads", elem_id="hunt-result")
        return {}

    def wire(self, ctx) -> None:
        from ..jobs import validate
        from ..ui import guarded, recipe_from_form

        def on_hunt(rounds, top_k, objective, **values):
            from ...hunt import hunt

            def search():
                recipe = validate(recipe_from_form(values, ctx.panels, ctx.default_model))
                with ctx.cache.use(recipe.model, recipe.device, recipe.dtype) as pipe:
                    return hunt(recipe, rounds=int(rounds), top_k=int(top_k), objective=objective or "shapes",
                                pipe=pipe, progress=None, distributed=False, user_objectives=False)

            return result_text(guarded(search))

        self.button.click(on_hunt, inputs=[self.rounds, self.top_k, self.objective], inputs_kwargs=dict(ctx.form),
                          outputs=[self.result], api_name="hunt", concurrency_id="generate")


PANEL = HuntPanel()
