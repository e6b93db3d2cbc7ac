"""The Gradio Blocks page: tabs of settings on the left, results on the right, every action a library call.

Endpoints (also what ``gradio_client`` calls): ``/generate`` (the form), ``/run_yaml`` (a recipe as YAML text),
``/recipe`` (the form as a recipe YAML file, "Download recipe"), ``/load_recipe`` (a YAML file -> the form),
``/layers`` (a model's layer, group and head selectors), plus the endpoints panels add (``/hunt``).
Form parameters are named ``prompt``, ``seeds``, ... and ``<panel>__<field>`` (``maps__words``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import AttnctlError, RecipeError
from .jobs import Result, RunFolders, generate, recipe_yaml, validate
from .panels import TABS, Panel, all_panels
from .pipelines import PipelineCache

log = logging.getLogger(__name__)

MODELS = ("shapes", "shapes-dit", "tiny:sd15", "tiny:sdxl", "tiny:sd3", "tiny:flux", "tiny:flux2", "tiny:flux2-dev",
          "tiny:chroma", "tiny:qwenimage", "tiny:zimage")
TAB_NOTES = {
    "Regions": "The `regions` control is not installed in this version of attnctl.",
    "Interpolate": "The `interpolate` control is not installed in this version of attnctl.",
    "Edit": "The `edit` control is not installed in this version of attnctl.",
    "Head search": "Head search (`attnctl.hunt`) is not installed in this version of attnctl.",
}


class AppContext:
    """What panels may use while building: the pipeline cache, run folders and shared widgets."""

    def __init__(self, cache: PipelineCache, folders: RunFolders, default_model: str):
        self.cache, self.folders, self.default_model = cache, folders, default_model
        self.layer_dropdowns: list[gr.Dropdown] = []
        self.model: gr.Dropdown | None = None
        self.form: dict[str, gr.components.Component] = {}  # every form input by API parameter name
        self.panels: list[tuple[Panel, dict[str, Any]]] = []

    def layer_selector(self, value=None, **kwargs) -> gr.Dropdown:
        """A multi-select of the model's selectors (kinds, block groups, layers, heads); free text allowed."""
        dropdown = gr.Dropdown(choices=[], value=value or [], multiselect=True, allow_custom_value=True, **kwargs)
        self.layer_dropdowns.append(dropdown)
        return dropdown

    def layer_choices(self, model: str) -> list[tuple[str, str]]:
        """(label, selector) for every kind, top-level block group, layer and head of ``model``."""
        from ..adapters import KINDS, adapter_for

        with self.cache.use(model or self.default_model) as pipe:
            adapter = adapter_for(pipe)
            sites = [site for site, _ in adapter.sites(adapter.denoiser(pipe))]
        kinds = [k for k in KINDS if any(s.kind == k for s in sites)]
        groups = list(dict.fromkeys(s.name.split(".")[0] for s in sites))
        return ([(f"kind={k} (every {k}-attention layer)", f"kind={k}") for k in kinds]
                + [(f"{g} (group)", g) for g in groups]
                + [(f"{s.name} [{s.kind}, {s.heads} heads]", s.name) for s in sites]
                + [(f"{s.name}:heads={h}", f"{s.name}:heads={h}") for s in sites for h in range(s.heads)])

    def run(self, data: dict, progress: gr.Progress, compare: bool = False) -> Result:
        """Generate ``data`` through the library; library errors become a readable ``gr.Error``."""
        checks = [panel.check for panel, _ in self.panels]
        return guarded(lambda: generate(data, self.cache, self.folders, checks=checks,
                                        on_wait=lambda text: progress(0, desc=text), compare=compare))


def guarded(fn: Callable):
    """Call ``fn``; any failure is shown as its message and the app keeps serving."""
    try:
        return fn()
    except AttnctlError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    except gr.Error:
        raise
    except Exception as exc:  # a bug or a torch failure: still a message, never a dead app
        log.exception("attnctl app: request failed")
        raise gr.Error(f"{type(exc).__name__}: {exc}") from None


# -- form <-> recipe -----------------------------------------------------------------------------------------
BASE_DEFAULTS = dict(model="shapes", prompt="", negative_prompt="", seeds="0", steps=25, guidance_scale=5.0,
                     width=0, height=0, scheduler="", device="auto", dtype="auto")


def _seeds(text: str) -> int | list[int]:
    try:
        seeds = [int(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise RecipeError(f"seeds = {text!r}: write whole numbers separated by commas, e.g. 0, 1, 2") from None
    if not seeds:
        raise RecipeError("seeds: give at least one seed, e.g. 0")
    return seeds[0] if len(seeds) == 1 else seeds


def recipe_from_form(values: dict[str, Any], panels: list[tuple[Panel, dict]], default_model: str) -> dict:
    """Form values (API parameter names) -> a recipe dict for ``attnctl.recipe.load_recipe``."""
    prompts = [line.strip() for line in str(values.get("prompt") or "").splitlines() if line.strip()]
    data: dict[str, Any] = {
        "model": (values.get("model") or default_model).strip(),
        "prompt": prompts[0] if len(prompts) == 1 else prompts,
        "seeds": _seeds(values.get("seeds", "0")),
        "steps": int(values.get("steps") or BASE_DEFAULTS["steps"]),
        "guidance_scale": float(values.get("guidance_scale") if values.get("guidance_scale") is not None else 5.0),
    }
    if (values.get("negative_prompt") or "").strip():
        data["negative_prompt"] = values["negative_prompt"].strip()
    for key in ("width", "height"):
        if values.get(key):
            data[key] = int(values[key])
    if (values.get("scheduler") or "").strip():
        data["scheduler"] = values["scheduler"].strip()
    for key in ("device", "dtype"):
        if values.get(key) and values[key] != "auto":
            data[key] = values[key]
    controls = {}
    for panel, inputs in panels:
        options = panel.options({name: values.get(f"{panel.key}__{name}") for name in inputs})
        if options is not None and panel.control is not None:
            controls[panel.control] = options
    if controls:
        data["controls"] = controls
    return data


def form_from_recipe(path: str, panels: list[tuple[Panel, dict]]) -> dict[str, Any]:
    """A recipe YAML file -> form values by API parameter name (validated by the library first)."""
    recipe = validate_file(path)
    prompts = recipe.prompts
    seeds = recipe.seed_list
    values = {"model": recipe.model, "prompt": "\n".join(prompts), "negative_prompt": recipe.negative_prompt or "",
              "seeds": ", ".join(map(str, seeds)), "steps": recipe.steps, "guidance_scale": recipe.guidance_scale,
              "width": recipe.width or 0, "height": recipe.height or 0, "scheduler": recipe.scheduler or "",
              "device": recipe.device, "dtype": recipe.dtype}
    for panel, inputs in panels:
        options = recipe.controls.get(panel.control) if panel.control else None
        for name, value in panel.fill(options).items():
            values[f"{panel.key}__{name}"] = value
    return values


def validate_file(path: str):
    from ..recipe import load_recipe

    return load_recipe(path)


def _outputs(result: Result, yaml_file: str):
    return ([(str(p), caption) for p, caption in result.images], [(str(p), caption) for p, caption in result.maps],
            gr.update(value=str(result.animation) if result.animation else None, visible=result.animation is not None),
            result.summary, yaml_file, result.recipe_yaml)


def _write_yaml(text: str, folder: Path | None = None) -> str:
    folder = folder or Path(tempfile.mkdtemp(prefix="attnctl-recipe-"))
    path = folder / "recipe.yaml"
    path.write_text(text)
    return str(path)


# -- the page ------------------------------------------------------------------------------------------------
def build_app(model: str = "shapes", *, cache: PipelineCache | None = None, folders: RunFolders | None = None,
              concurrency: int = 2) -> gr.Blocks:
    """The attnctl app. ``model`` is the initial model string; ``concurrency`` bounds generations in flight
    (one per loaded model in any case)."""
    ctx = AppContext(cache or PipelineCache(), folders or RunFolders(), model)
    panels = all_panels()
    tabs = list(TABS) + [p.tab for p in panels if p.tab not in TABS]
    with gr.Blocks(title="attnctl", analytics_enabled=False) as demo:
        gr.Markdown("# attnctl\nAttention control for diffusers pipelines: set a prompt, switch controls on, "
                    "generate. Anything done here can be downloaded as a recipe and re-run with `attnctl run`.")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs():
                    for tab in tabs:
                        with gr.Tab(tab, id=tab):
                            if tab == "Generate":
                                _base_form(ctx)
                                if any(p.tab == tab for p in panels):
                                    gr.Markdown("### Controls")
                            mine = [p for p in panels if p.tab == tab]
                            if not mine and tab != "Generate":
                                gr.Markdown(TAB_NOTES.get(tab, ""))
                            for panel in mine:
                                inputs = panel.build(ctx)
                                ctx.panels.append((panel, inputs))
                                ctx.form.update({f"{panel.key}__{name}": c for name, c in inputs.items()})
                    with gr.Tab("Recipe", id="Recipe"):
                        recipe_box = gr.Code("", language="yaml", label="Recipe (YAML)", interactive=True,
                                             elem_id="recipe-yaml")
                        with gr.Row():
                            to_yaml = gr.Button("Download recipe", elem_id="recipe-download")
                            run_yaml = gr.Button("Run this YAML", elem_id="recipe-run")
                            upload = gr.UploadButton("Load recipe", file_types=[".yaml", ".yml"], elem_id="recipe-load")
            with gr.Column(scale=2):
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                summary = gr.Markdown(elem_id="summary")
                images = gr.Gallery(label="Images", columns=3, elem_id="images", format="png")
                maps = gr.Gallery(label="Attention maps", columns=3, elem_id="maps", format="png")
                animation = gr.Image(label="Animation", visible=False, elem_id="animation")
                recipe_file = gr.File(label="Recipe of this result (re-run with `attnctl run`)", elem_id="recipe-file")
        results = [images, maps, animation, summary, recipe_file, recipe_box]

        def on_generate(progress=gr.Progress(track_tqdm=True), **values):
            data = guarded(lambda: recipe_from_form(values, ctx.panels, ctx.default_model))
            result = ctx.run(data, progress, compare=bool(values.get("compare")))
            return _outputs(result, _write_yaml(result.recipe_yaml, result.folder))

        def on_run_yaml(text: str, progress=gr.Progress(track_tqdm=True)):
            import yaml

            try:
                data = yaml.safe_load(text or "")
            except yaml.YAMLError as exc:
                raise gr.Error(f"the recipe is not valid YAML: {exc}") from None
            if not isinstance(data, dict):
                raise gr.Error("a recipe is a mapping of keys (model:, prompt:, ...)")
            result = ctx.run(data, progress)
            return _outputs(result, _write_yaml(result.recipe_yaml, result.folder))

        def on_recipe(**values):
            def build():
                data = recipe_from_form(values, ctx.panels, ctx.default_model)
                validate(data)
                return recipe_yaml(data)

            text = guarded(build)
            return _write_yaml(text), text

        def on_load(file):
            if file is None:
                raise gr.Error("choose a recipe YAML file")
            values = guarded(lambda: form_from_recipe(getattr(file, "name", file), ctx.panels))
            return [values.get(name, gr.update()) for name in form_names]

        def on_layers(model: str):
            choices = guarded(lambda: ctx.layer_choices(model))
            updates = [gr.update(choices=choices) for _ in ctx.layer_dropdowns]
            return updates[0] if len(updates) == 1 else updates  # one output takes the update itself

        form_names = list(ctx.form)
        form_components = [ctx.form[name] for name in form_names]
        for panel, _ in ctx.panels:
            panel.wire(ctx)
        go.click(on_generate, inputs_kwargs=dict(ctx.form), outputs=results, api_name="generate",
              concurrency_id="generate", concurrency_limit=concurrency)
        run_yaml.click(on_run_yaml, inputs=[recipe_box], outputs=results, api_name="run_yaml",
                       concurrency_id="generate", concurrency_limit=concurrency)
        to_yaml.click(on_recipe, inputs_kwargs=dict(ctx.form), outputs=[recipe_file, recipe_box], api_name="recipe")
        upload.upload(on_load, inputs=[upload], outputs=form_components, api_name="load_recipe")
        if ctx.layer_dropdowns:
            ctx.model.change(on_layers, inputs=[ctx.model], outputs=ctx.layer_dropdowns, api_name="layers")
            demo.load(on_layers, inputs=[ctx.model], outputs=ctx.layer_dropdowns, api_visibility="private")
    demo.queue(default_concurrency_limit=concurrency)
    return demo


def _base_form(ctx: AppContext) -> None:
    from ..models import embedded_path

    choices = [m for m in MODELS if not m.startswith("shapes") or embedded_path(m) is not None]
    ctx.model = gr.Dropdown(choices, value=ctx.default_model, allow_custom_value=True, label="Model",
                            info="shapes, shapes-dit, tiny:*, a local folder or a hub id", elem_id="model")
    prompt = gr.Textbox("", label="Prompt", lines=2, placeholder="a red circle and a blue square",
                        info="one prompt per line; each gets an image per seed", elem_id="prompt")
    negative = gr.Textbox("", label="Negative prompt", elem_id="negative-prompt")
    with gr.Row():
        seeds = gr.Textbox("0", label="Seeds", info="comma-separated", elem_id="seeds")
        steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="steps")
        guidance = gr.Slider(0.0, 20.0, value=5.0, step=0.5, label="Guidance scale", elem_id="guidance")
    with gr.Row():
        width = gr.Number(0, precision=0, label="Width", info="0: the model's size", elem_id="width")
        height = gr.Number(0, precision=0, label="Height", info="0: the model's size", elem_id="height")
    with gr.Accordion("Advanced", open=False):
        scheduler = gr.Textbox("", label="Scheduler", info="a diffusers scheduler class, e.g. EulerDiscreteScheduler; "
                               "empty: the model's own", elem_id="scheduler")
        with gr.Row():
            device = gr.Textbox("auto", label="Device", info="auto, cpu, cuda, cuda:N", elem_id="device")
            dtype = gr.Dropdown(["auto", "float32", "float16", "bfloat16"], value="auto", label="dtype",
                                elem_id="dtype")
    compare = gr.Checkbox(False, label="Compare with no controls",
                          info="also generate each image without the controls (same prompt and seed): "
                               "baseline | controlled sheets first among the images", elem_id="compare")
    ctx.form.update(model=ctx.model, prompt=prompt, negative_prompt=negative, seeds=seeds, steps=steps,
                    guidance_scale=guidance, width=width, height=height, scheduler=scheduler, device=device,
                    dtype=dtype, compare=compare)
