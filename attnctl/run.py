"""Recipe -> images + ``run.json`` in a new run folder. The CLI, the app and tests all call ``run_recipe``.

Every run gets a fresh folder (never overwritten). An *item* is one image: (sweep setting, prompt, seed),
setting-major; each item is one pipeline call with its own seeded generator, so an item's image does not depend
on which other items ran, in which process, or in what order. After each image the folder is consistent: the
PNG (with the item's own recipe, prompt and seed in its text metadata, enough to re-run it alone) and a
``run.json`` written atomically, so Ctrl-C or an error leaves the finished images and a valid ``run.json``
(``status`` says how the run ended). Sweeps and multi-image runs also get ``contact_sheet.png``.

Scale-out: under ``accelerate launch --num_processes N --multi_gpu -m attnctl run RECIPE`` (also on CPU) each
process takes the items ``i`` with ``i % N == rank``; process 0 makes the folder and, at the end, gathers every
process's records into the one ``run.json``.

A control may generate an item itself (an edit needs source and target rows in one call): if it has
``generate_item(pipe, prompt, seed, kwargs) -> dict | None``, it is called inside the item's ``apply`` with the
call's keyword arguments instead of ``pipe(prompt, **kwargs)``, and returns ``{"image": PIL image or None,
"extra": {name: PIL image or None}, "files": {name: bytes}, "info": {...}}``; the image is the item's PNG, extra
images are saved as ``<stem>_<name>.png`` and other files (a GIF) as ``<stem>_<name>``, all listed under ``files``
in the item's ``run.json`` entry, ``info`` under ``info``. ``None`` falls back to the plain call. A control class
with ``takes_all_prompts = True`` (interpolation) gets every prompt of the recipe at once: one item per seed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL.PngImagePlugin import PngInfo

from .errors import RecipeError
from .processes import Processes
from .recipe import Recipe


@dataclass(frozen=True)
class Item:
    """One image of a run: its index in the whole run, its sweep setting and its prompt and seed."""

    index: int
    setting: int
    values: tuple[tuple[str, object], ...]
    prompt: str | tuple[str, ...]  # a tuple: a control that takes every prompt at once (interpolation)
    seed: int

    @property
    def stem(self) -> str:
        return f"{self.index:04d}" + (f"_set{self.setting}" if self.values else "") + f"_seed{self.seed}"


def item_recipe_text(recipe: Recipe, item: Item) -> str:
    """The YAML recipe of ``item`` alone, written into its PNG so that ``attnctl run`` on it re-makes that one
    image: ``recipe`` (the item's sweep setting already applied) with the item's prompt and seed in place of the
    lists, and no sweep. An item holding every prompt (interpolation) keeps them as a list: that is one image."""
    data = recipe.model_dump(exclude={"sweep"})
    data["prompt"] = list(item.prompt) if isinstance(item.prompt, tuple) else item.prompt
    data["seeds"] = item.seed
    return yaml.safe_dump(data, sort_keys=False)


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _versions() -> dict:
    import diffusers
    import transformers

    from . import __version__

    return {"attnctl": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def items_of(recipe: Recipe) -> list[Item]:
    """Every item of ``recipe``: setting-major, then prompt, then seed. With a control that takes all prompts at
    once (``takes_all_prompts``, e.g. interpolation between them) an item is (setting, seed) with every prompt."""
    from .controls import control_class

    items = []
    for k, setting in enumerate(recipe.settings()):
        sub = recipe.at(setting) if setting else recipe
        together = any(getattr(control_class(name), "takes_all_prompts", False) for name in sub.controls)
        for prompt in [tuple(sub.prompts)] if together else sub.prompts:
            for seed in sub.seed_list:
                items.append(Item(len(items), k, tuple(setting.items()), prompt, seed))
    return items


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
               pipe=None, distributed: bool | None = None, compare: bool = False, folder: str | Path | None = None,
               pipes: dict | None = None) -> Path:
    """Generate every item of ``recipe``; returns the run folder. ``distributed=None`` follows the launcher
    (``WORLD_SIZE`` > 1 under accelerate/torchrun); ``pipe`` reuses an already loaded pipeline.

    ``compare``: also generate each item without controls and write one ``baseline | controlled`` sheet per
    setting (see ``attnctl.compare``). ``folder``: write into this new folder instead of a fresh timestamped one
    under ``out`` (it must not exist yet). ``pipes``: a shared ``{(model, device, dtype): pipeline}`` cache."""
    from tqdm.auto import tqdm

    from .engine import apply
    from .models import load

    if compare:
        from .compare import check_comparable

        check_comparable(recipe)
    procs = Processes(distributed)
    items = items_of(recipe)
    if folder is not None:
        if procs.main:
            Path(folder).mkdir(parents=True, exist_ok=False)
        folder = procs.broadcast(str(folder))
    else:
        folder = procs.broadcast(str(new_run_folder(Path(out or recipe.output), name)) if procs.main else None)
    folder = Path(folder)
    record = {"status": "running", "recipe": recipe.model_dump(), "settings": recipe.settings(),
              "versions": _versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "processes": procs.world,
              "images": []}
    own_json = folder / ("run.json" if procs.world == 1 else f"run.rank{procs.rank}.json")
    _write_json(own_json, record)
    if procs.world > 1 and procs.main:
        _write_json(folder / "run.json", record)  # replaced by the gathered record at the end

    mine = [it for it in items if it.index % procs.world == procs.rank]
    pipes = {} if pipes is None else pipes
    baselines: dict[str, str] = {}  # baseline_key -> PNG file, shared by every setting of a sweep
    default_scheduler = {}
    try:
        # Bars: the sweep's settings (when there are several), this run's images, and the pipeline's steps.
        show = progress and procs.main
        n_settings = len({it.setting for it in mine})
        sweep_bar = tqdm(total=n_settings, desc="sweep", unit="setting", position=0,
                         disable=not show or n_settings <= 1)
        bar = tqdm(mine, desc="images", unit="image", position=int(n_settings > 1), disable=not show)
        current = None
        for item in bar:
            if current is None or current[0] != item.setting:
                if current is not None:
                    sweep_bar.update(1)
                sub = recipe.at(dict(item.values)) if item.values else recipe
                key = (sub.model, sub.device, sub.dtype)
                if key not in pipes:
                    pipes[key] = pipe if (pipe is not None and sub.model == recipe.model) else load(
                        sub.model, device=procs.device or sub.device, dtype=sub.dtype)
                if key not in default_scheduler:
                    default_scheduler[key] = pipes[key].scheduler
                    pipes[key].set_progress_bar_config(disable=not progress or not procs.main, leave=False)
                p = pipes[key]
                p.scheduler = default_scheduler[key]
                set_scheduler(p, sub.scheduler, sub.scheduler_options)
                current = (item.setting, sub, p, sub.build_controls())
                record.setdefault("device", str(getattr(p, "device", "cpu")))
                if item.values:
                    sweep_bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in item.values))
            _, sub, p, controls = current
            entry = _generate(item, sub, p, controls, item_recipe_text(sub, item), folder, apply)
            if compare:
                _add_baseline(entry, item, sub, p, controls, folder, baselines)
            if procs.world > 1:
                entry["process"] = procs.rank
            record["images"].append(entry)
            _write_json(own_json, record)
        if current is not None:
            sweep_bar.update(1)
        sweep_bar.close()
        bar.close()
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        _write_json(own_json, record)
        raise
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = str(exc)
        _write_json(own_json, record)
        raise
    finally:
        for key, scheduler in default_scheduler.items():  # a loaded or passed-in pipeline keeps its own
            pipes[key].scheduler = scheduler
    record["status"] = "complete"
    if procs.world > 1:
        procs.barrier()
        parts = procs.gather([record])
        if procs.main:
            record = dict(parts[0])
            record["images"] = sorted((e for part in parts for e in part["images"]), key=lambda e: e["index"])
            record["status"] = "complete" if all(p["status"] == "complete" for p in parts) else "failed"
            record["devices"] = sorted({p.get("device", "?") for p in parts})
        procs.barrier()
    if procs.main:
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        if len(items) > 1:
            contact_sheet(folder, record["images"], recipe).save(folder / "contact_sheet.png")
            record["contact_sheet"] = "contact_sheet.png"
        if compare:
            record["compare_sheets"] = _compare_sheets(folder, record["images"], recipe)
        _write_json(folder / "run.json", record)
        for rank in range(1, procs.world):
            (folder / f"run.rank{rank}.json").unlink(missing_ok=True)
        if procs.world > 1:
            (folder / "run.rank0.json").unlink(missing_ok=True)
    procs.barrier()
    return folder


def part_name(index: int, recipe: Recipe) -> str:
    """Subfolder name of recipe ``index`` (0-based) of a showcase: ``1-shapes-excite``."""
    controls = "-".join(recipe.controls) or "plain"
    return f"{index + 1}-{recipe.model.replace(':', '_').replace('/', '_')}-{controls}"


def run_recipes(recipes: list[Recipe], *, out: str | Path | None = None, name: str = "run", progress: bool = True,
                distributed: bool | None = None, compare: bool = False) -> Path:
    """Run several recipes (a showcase file's documents) into subfolders of one new run folder, loading each
    model once; with ``compare`` the parts' sheets are also stacked into the folder's ``compare.png``, else
    their contact sheets into ``contact_sheet.png``. The folder's ``run.json`` lists the parts (each has its
    own). Every recipe is checked before anything is generated."""
    if len(recipes) == 1:
        return run_recipe(recipes[0], out=out, name=name, progress=progress, distributed=distributed,
                          compare=compare)
    from PIL import Image

    from .compare import check_comparable, stack_sheets

    if compare:
        for i, recipe in enumerate(recipes):
            check_comparable(recipe, f"recipe {i + 1} of {len(recipes)}")
    procs = Processes(distributed)
    folder = Path(procs.broadcast(str(new_run_folder(Path(out or recipes[0].output), name)) if procs.main else None))
    pipes: dict = {}
    parts = []
    for i, recipe in enumerate(recipes):
        sub = run_recipe(recipe, progress=progress, distributed=distributed, compare=compare,
                         folder=folder / part_name(i, recipe), pipes=pipes)
        parts.append(sub)
    if procs.main:
        sheets = []
        for sub in parts:
            record = json.loads((sub / "run.json").read_text())
            names = record.get("compare_sheets") if compare else [record.get("contact_sheet")]
            sheets += [Image.open(sub / n).convert("RGB") for n in names or [] if n]
            if not compare and not record.get("contact_sheet") and record["images"] and record["images"][0]["file"]:
                sheets.append(Image.open(sub / record["images"][0]["file"]).convert("RGB"))
        sheet = "compare.png" if compare else "contact_sheet.png"
        if sheets:
            stack_sheets(sheets).save(folder / sheet)
        _write_json(folder / "run.json", {"status": "complete", "parts": [p.name for p in parts],
                                          "sheet": sheet if sheets else None, "compare": compare,
                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    procs.barrier()
    return folder


def _call_kwargs(recipe: Recipe, seed: int) -> dict:
    """The pipeline call's keyword arguments for one image of ``recipe``."""
    kwargs = dict(num_inference_steps=recipe.steps, guidance_scale=recipe.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(seed))
    if recipe.negative_prompt is not None:
        kwargs["negative_prompt"] = recipe.negative_prompt
    if recipe.height:
        kwargs["height"] = recipe.height
    if recipe.width:
        kwargs["width"] = recipe.width
    return kwargs


def _add_baseline(entry: dict, item: Item, recipe: Recipe, pipe, controls, folder: Path,
                  baselines: dict[str, str]) -> None:
    """Generate (or reuse) ``item``'s image without controls; add it and, on ShapesWorld models, the detector's
    reading of both images to ``entry``."""
    from PIL import Image

    from .compare import SHAPES_MODELS, baseline_key, baseline_prompt, detector_line, generate_baseline

    prompt = baseline_prompt(controls, list(item.prompt) if isinstance(item.prompt, tuple) else item.prompt)
    key = baseline_key(recipe, prompt, item.seed)
    if key not in baselines:
        kwargs = _call_kwargs(recipe, item.seed)
        kwargs.pop("generator")
        image = generate_baseline(pipe, prompt, kwargs, item.seed)
        name = f"baseline_{len(baselines):04d}_seed{item.seed}.png"
        info = PngInfo()
        info.add_text("attnctl:prompt", prompt if isinstance(prompt, str) else json.dumps(prompt))
        info.add_text("attnctl:seed", str(item.seed))
        info.add_text("attnctl:baseline", "the recipe without its controls")
        image.save(folder / name, pnginfo=info)
        baselines[key] = name
    entry["baseline"] = baselines[key]
    if recipe.model in SHAPES_MODELS and entry.get("file") and isinstance(prompt, str):
        reads = {"baseline": detector_line(Image.open(folder / entry["baseline"]), prompt),
                 "controlled": detector_line(Image.open(folder / entry["file"]), prompt)}
        if all(reads.values()):
            entry["detector"] = reads


def _compare_sheets(folder: Path, entries: list[dict], recipe: Recipe) -> list[str]:
    """One ``baseline | controlled`` sheet per sweep setting: ``compare.png`` or ``compare_set{k}.png``."""
    from .compare import compare_sheet

    names = []
    settings = recipe.settings()
    for k, setting in enumerate(settings):
        chosen = [e for e in entries if e.get("setting", 0) == k]
        if not chosen:
            continue
        values = ", ".join(f"{p}={v}" for p, v in setting.items())
        controls = ", ".join((recipe.at(setting) if setting else recipe).controls)
        title = f"{recipe.model}: {controls}" + (f" [{values}]" if values else "")
        name = "compare.png" if len(settings) == 1 else f"compare_set{k}.png"
        compare_sheet(folder, chosen, title).save(folder / name)
        names.append(name)
    return names


def _generate(item: Item, recipe: Recipe, pipe, controls, recipe_text: str, folder: Path, apply) -> dict:
    """One pipeline call for ``item``; writes its PNG (and map overlays) and returns its run.json entry."""
    from .controls.maps import Maps
    from .heatmap import overlay

    kwargs = _call_kwargs(recipe, item.seed)
    start = time.perf_counter()
    prompt = list(item.prompt) if isinstance(item.prompt, tuple) else item.prompt
    with apply(pipe, controls) as session:
        made = next((m for c in controls if hasattr(c, "generate_item")
                     for m in [c.generate_item(pipe, prompt, item.seed, kwargs)] if m is not None), None)
        image = pipe(prompt=prompt, **kwargs).images[0] if made is None else made.get("image")
        diagnostics = session.last_run().get("controls", {})
    seconds = time.perf_counter() - start
    info = PngInfo()
    info.add_text("attnctl:recipe", recipe_text)
    info.add_text("attnctl:prompt", prompt if isinstance(prompt, str) else json.dumps(prompt))
    info.add_text("attnctl:seed", str(item.seed))
    entry = {"index": item.index, "file": None, "prompt": prompt, "seed": item.seed, "seconds": round(seconds, 4),
             "diagnostics": diagnostics}
    if image is not None:
        image.save(folder / f"{item.stem}.png", pnginfo=info)
        entry["file"] = f"{item.stem}.png"
    if made is not None:  # a generating control: more images, other files (GIF), its own metadata
        entry["files"], entry["info"] = {}, made.get("info", {})
        for name, extra in made.get("extra", {}).items():
            if extra is not None:
                extra.save(folder / f"{item.stem}_{name}.png", pnginfo=info)
                entry["files"][name] = f"{item.stem}_{name}.png"
        for name, data in made.get("files", {}).items():
            (folder / f"{item.stem}_{name}").write_bytes(data)
            entry["files"][name] = f"{item.stem}_{name}"
    if item.values:
        entry["setting"] = item.setting
        entry["values"] = dict(item.values)
    if recipe.save_maps:
        for control in controls:
            if isinstance(control, Maps):
                entry["maps"] = {}
                missing = {m["word"] for m in diagnostics.get("maps", {}).get("missing", [])}
                for word, values in control.maps.items():
                    if word in missing:
                        continue
                    map_file = f"{item.stem}_map_{word.replace(' ', '_').replace('#', '-')}.png"
                    overlay(image, values[0]).save(folder / map_file)
                    entry["maps"][word] = map_file
    return entry


def contact_sheet(folder: Path, entries: list[dict], recipe: Recipe, cell: int = 128):
    """One image with a row per (setting, prompt) and a column per seed, each row labelled."""
    from PIL import Image, ImageDraw, ImageFont

    rows: dict[tuple, dict[int, str]] = {}
    labels: dict[tuple, str] = {}
    seeds: list[int] = []
    for e in entries:
        if not e.get("file"):
            continue
        prompt = e["prompt"] if isinstance(e["prompt"], str) else " -> ".join(e["prompt"])
        key = (e.get("setting", 0), prompt)
        rows.setdefault(key, {})[e["seed"]] = e["file"]
        values = ", ".join(f"{k}={v}" for k, v in e.get("values", {}).items())
        labels[key] = (values + " | " if values else "") + prompt
        if e["seed"] not in seeds:
            seeds.append(e["seed"])
    font = ImageFont.load_default()
    label_h = 14
    images = {(key, seed): Image.open(folder / name).convert("RGB")
              for key, by_seed in rows.items() for seed, name in by_seed.items()}
    col = max([cell] + [round(img.width * cell / img.height) for img in images.values()])  # wide strips
    sheet = Image.new("RGB", (max(1, len(seeds)) * col, len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, key in enumerate(rows):
        y = r * (cell + label_h)
        draw.text((2, y + 1), labels[key][: sheet.width // 6], fill="black", font=font)
        for c, seed in enumerate(seeds):
            if (key, seed) in images:
                img = images[(key, seed)]
                scale = cell / img.height
                img = img.resize((max(1, round(img.width * scale)), cell),
                                 Image.NEAREST if scale >= 1 else Image.LANCZOS)
                sheet.paste(img, (c * col, y + label_h))
    return sheet
