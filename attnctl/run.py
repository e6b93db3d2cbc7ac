"""Recipe -> images + ``run.json`` in a new run folder. The CLI, the app and tests all call ``run_recipe``.

Every run gets a fresh folder (never overwritten). After each image the folder is consistent: the PNG (with
the recipe, prompt and seed in its text metadata) and a ``run.json`` written atomically, so Ctrl-C or an error
leaves the finished images and a valid ``run.json`` (``status`` says how the run ended).

A control may generate an item itself (an edit needs source and target rows in one call): if it has
``generate_item(pipe, prompt, seed, kwargs) -> dict | None``, it is called inside the run's ``apply`` with the
call's keyword arguments instead of ``pipe(prompt, **kwargs)``, and returns ``{"image": PIL image,
"extra": {name: PIL image or None}, "info": {...}}``; extra images are saved as ``<stem>_<name>.png`` and listed
under ``files`` in the image's ``run.json`` entry, ``info`` under ``info``. ``None`` falls back to the plain call.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch
import yaml
from PIL.PngImagePlugin import PngInfo

from .errors import RecipeError
from .recipe import Recipe


def new_run_folder(base: Path, name: str) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(10000):
        path = base / (f"{stamp}-{name}" + (f"-{i}" if i else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RecipeError(f"cannot create a new run folder in {base}")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _versions() -> dict:
    import diffusers
    import transformers

    from . import __version__

    return {"attnctl": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def items_of(recipe: Recipe) -> list[tuple[str, int]]:
    """(prompt, seed) for every image, prompt-major."""
    return list(itertools.product(recipe.prompts, recipe.seed_list))


def set_scheduler(pipe, name: str | None, options: dict) -> None:
    if not name:
        if options:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **options)
        return
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        names = sorted(n for n in dir(diffusers) if n.endswith("Scheduler"))
        from .errors import did_you_mean

        raise RecipeError(f"scheduler {name!r} is not a diffusers scheduler{did_you_mean(name, names)}; "
                          f"e.g. {', '.join(names[:6])}, ...")
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)


def run_recipe(recipe: Recipe, *, out: str | Path | None = None, name: str = "run", progress: bool = True,
               pipe=None) -> Path:
    """Generate every (prompt, seed) of ``recipe``; returns the run folder."""
    from tqdm.auto import tqdm

    from .controls.maps import Maps
    from .engine import apply
    from .heatmap import overlay
    from .models import load

    pipe = pipe if pipe is not None else load(recipe.model, device=recipe.device, dtype=recipe.dtype)
    set_scheduler(pipe, recipe.scheduler, recipe.scheduler_options)
    controls = recipe.build_controls()
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    folder = new_run_folder(Path(out or recipe.output), name)
    device = str(getattr(pipe, "device", "cpu"))
    record = {"status": "running", "recipe": recipe.model_dump(), "versions": _versions(), "device": device,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "images": []}
    _write_json(folder / "run.json", record)
    recipe_text = yaml.safe_dump(recipe.model_dump(), sort_keys=False)
    try:
        with apply(pipe, controls) as session:
            for index, (prompt, seed) in enumerate(tqdm(items_of(recipe), desc="images", disable=not progress)):
                kwargs = dict(num_inference_steps=recipe.steps, guidance_scale=recipe.guidance_scale,
                              generator=torch.Generator("cpu").manual_seed(seed))
                if recipe.negative_prompt is not None:
                    kwargs["negative_prompt"] = recipe.negative_prompt
                if recipe.height:
                    kwargs["height"] = recipe.height
                if recipe.width:
                    kwargs["width"] = recipe.width
                start = time.perf_counter()
                item = next((made for c in controls if hasattr(c, "generate_item")
                             for made in [c.generate_item(pipe, prompt, seed, kwargs)] if made is not None), None)
                image = pipe(prompt, **kwargs).images[0] if item is None else item["image"]
                seconds = time.perf_counter() - start
                info = PngInfo()
                info.add_text("attnctl:recipe", recipe_text)
                info.add_text("attnctl:prompt", prompt)
                info.add_text("attnctl:seed", str(seed))
                stem = f"{index:04d}_seed{seed}"
                image.save(folder / f"{stem}.png", pnginfo=info)
                entry = {"file": f"{stem}.png", "prompt": prompt, "seed": seed, "seconds": round(seconds, 4),
                         "diagnostics": session.last_run().get("controls", {})}
                if item is not None:
                    entry["files"], entry["info"] = {}, item.get("info", {})
                    for extra_name, extra in item.get("extra", {}).items():
                        if extra is not None:
                            extra.save(folder / f"{stem}_{extra_name}.png", pnginfo=info)
                            entry["files"][extra_name] = f"{stem}_{extra_name}.png"
                if recipe.save_maps:
                    for control in controls:
                        if isinstance(control, Maps):
                            entry["maps"] = {}
                            missing = {m["word"] for m in entry["diagnostics"].get("maps", {}).get("missing", [])}
                            for word, values in control.maps.items():
                                if word in missing:
                                    continue
                                map_file = f"{stem}_map_{word.replace(' ', '_').replace('#', '-')}.png"
                                overlay(image, values[0]).save(folder / map_file)
                                entry["maps"][word] = map_file
                record["images"].append(entry)
                _write_json(folder / "run.json", record)
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        _write_json(folder / "run.json", record)
        raise
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = str(exc)
        _write_json(folder / "run.json", record)
        raise
    record["status"] = "complete"
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_json(folder / "run.json", record)
    return folder
