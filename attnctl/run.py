"""Recipe -> images + ``run.json`` in a new run folder. The CLI, the app and tests all call ``run_recipe``.

A control with a ``generate_item(pipe, prompts, seed, call_kwargs) -> dict`` method (e.g. ``interpolate``) makes
each seed one item holding all prompts: it runs the pipeline itself and returns ``images`` [(name, PIL image)],
``files`` {name: bytes} and ``metadata`` (stored in the item's run.json entry under the control's name).

Every run gets a fresh folder (never overwritten). After each image the folder is consistent: the PNG (with
the recipe, prompt and seed in its text metadata) and a ``run.json`` written atomically, so Ctrl-C or an error
leaves the finished images and a valid ``run.json`` (``status`` says how the run ended).
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


def _save_item(folder: Path, stem: str, item: dict, recipe_text: str, prompt, seed: int) -> dict:
    """Write what a generating control returned: ``images`` [(name, PIL image)] as PNGs with the recipe in their
    metadata, ``files`` {name: bytes} as they are. Returns the run.json entry (without timing)."""
    names = []
    for name, image in item.get("images", []):
        info = PngInfo()
        info.add_text("attnctl:recipe", recipe_text)
        info.add_text("attnctl:prompt", json.dumps(prompt))
        info.add_text("attnctl:seed", str(seed))
        names.append(f"{stem}_{name}.png")
        image.save(folder / names[-1], pnginfo=info)
    files = {}
    for name, data in item.get("files", {}).items():
        files[name] = f"{stem}_{name}"
        (folder / files[name]).write_bytes(data)
    return {"file": names[0] if names else None, "frames": names, "files": files, "prompt": prompt, "seed": seed}


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
    generating = [c for c in controls if callable(getattr(c, "generate_item", None))]
    if len(generating) > 1:
        raise RecipeError(f"controls {', '.join(c.name for c in generating)} each generate whole items; use one")
    # A generating control takes all prompts at once: one item per seed.
    items = [(recipe.prompts, seed) for seed in recipe.seed_list] if generating else items_of(recipe)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    folder = new_run_folder(Path(out or recipe.output), name)
    device = str(getattr(pipe, "device", "cpu"))
    record = {"status": "running", "recipe": recipe.model_dump(), "versions": _versions(), "device": device,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "images": []}
    _write_json(folder / "run.json", record)
    recipe_text = yaml.safe_dump(recipe.model_dump(), sort_keys=False)
    try:
        with apply(pipe, controls) as session:
            for index, (prompt, seed) in enumerate(tqdm(items, desc="images", disable=not progress)):
                kwargs = dict(num_inference_steps=recipe.steps, guidance_scale=recipe.guidance_scale,
                              generator=torch.Generator("cpu").manual_seed(seed))
                if recipe.negative_prompt is not None:
                    kwargs["negative_prompt"] = recipe.negative_prompt
                if recipe.height:
                    kwargs["height"] = recipe.height
                if recipe.width:
                    kwargs["width"] = recipe.width
                start = time.perf_counter()
                if generating:
                    item = generating[0].generate_item(pipe, prompt, seed, kwargs)
                    entry = _save_item(folder, f"{index:04d}_seed{seed}", item, recipe_text, prompt, seed)
                    entry.update(seconds=round(time.perf_counter() - start, 4),
                                 diagnostics=session.last_run().get("controls", {}))
                    entry[generating[0].name] = item.get("metadata", {})
                    record["images"].append(entry)
                    _write_json(folder / "run.json", record)
                    continue
                image = pipe(prompt, **kwargs).images[0]
                seconds = time.perf_counter() - start
                info = PngInfo()
                info.add_text("attnctl:recipe", recipe_text)
                info.add_text("attnctl:prompt", prompt)
                info.add_text("attnctl:seed", str(seed))
                stem = f"{index:04d}_seed{seed}"
                image.save(folder / f"{stem}.png", pnginfo=info)
                entry = {"file": f"{stem}.png", "prompt": prompt, "seed": seed, "seconds": round(seconds, 4),
                         "diagnostics": session.last_run().get("controls", {})}
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
