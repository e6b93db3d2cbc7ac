"""One app request: a recipe dict -> the library's run -> what the page shows (no gradio here).

The app never generates on its own: it validates with ``attnctl.recipe.load_recipe`` and runs with
``attnctl.run.run_recipe`` into a fresh folder per request, then reads that run's ``run.json`` (images, map
overlays, diagnostics) back. Everything a request needs travels in its arguments (per-request state only).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..recipe import Recipe, load_recipe
from .pipelines import PipelineCache

# Recipe keys the app owns: runs go to its own folders, and overlays are always written.
APP_KEYS = ("output", "save_maps")


@dataclass
class Result:
    """What one generation produced. Paths point into ``folder``; captions name prompt, seed and word."""

    folder: Path
    recipe_yaml: str
    images: list[tuple[Path, str]] = field(default_factory=list)
    maps: list[tuple[Path, str]] = field(default_factory=list)
    animation: Path | None = None
    summary: str = ""


class RunFolders:
    """A parent folder per request under one root, keeping the newest ``keep`` (older ones are deleted)."""

    def __init__(self, root: str | Path | None = None, keep: int = 32):
        self.root = Path(root) if root else Path(tempfile.gettempdir()) / "attnctl-app"
        self.keep = keep
        self._lock = threading.Lock()

    def new(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            parents = sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime)
            for old in parents[: max(0, len(parents) - self.keep + 1)]:
                shutil.rmtree(old, ignore_errors=True)
            return Path(tempfile.mkdtemp(prefix="run-", dir=self.root))


def recipe_yaml(data: dict) -> str:
    """The YAML a user downloads: what they set, without the app's own keys."""
    clean = {k: v for k, v in data.items() if k not in APP_KEYS and v is not None and v != {}}
    return yaml.safe_dump(clean, sort_keys=False, allow_unicode=True)


def validate(data: dict) -> Recipe:
    """The library's validation of a recipe dict (``RecipeError`` with one line per problem)."""
    return load_recipe({k: v for k, v in data.items() if v is not None})


def generate(data: dict, cache: PipelineCache, folders: RunFolders, *,
             checks: Iterable[Callable] = (), progress: bool = True,
             on_wait: Callable[[str], None] | None = None, compare: bool = False) -> Result:
    """Run the recipe ``data`` on a cached pipeline; ``checks(pipe, recipe)`` may raise before generating.
    ``compare``: also without the controls, the ``baseline | controlled`` sheets first among the images."""
    recipe = validate(data)
    if compare:
        from ..compare import check_comparable

        check_comparable(recipe, "the form")
    if on_wait is not None and cache.busy(recipe.model, recipe.device, recipe.dtype):
        on_wait(f"waiting for {recipe.model}: another generation is using it")
    from ..run import run_recipe

    with cache.use(recipe.model, recipe.device, recipe.dtype) as pipe:
        for check in checks:
            check(pipe, recipe)
        folder = run_recipe(recipe.model_copy(update={"save_maps": True}), pipe=pipe, out=folders.new(),
                            name="app", progress=progress, distributed=False, compare=compare)
    return read_run(folder, recipe_yaml(data))


def read_run(folder: Path, recipe_text: str) -> Result:
    """A finished run folder -> images, map overlays and a one-line summary, from its ``run.json``."""
    record = json.loads((folder / "run.json").read_text())
    result = Result(folder=folder, recipe_yaml=recipe_text)
    seconds = 0.0
    for sheet in record.get("compare_sheets", []):
        result.images.append((folder / sheet, "baseline (no control) | controlled, with each image's diagnostics"))
    for entry in record["images"]:
        label = f"{entry['prompt']} (seed {entry['seed']}" + (f", {entry['setting']})" if entry.get("setting") else ")")
        if entry.get("file"):
            result.images.append((folder / entry["file"], label))
        for name, extra in entry.get("files", {}).items():  # a generating control's other images (edit: source,
            if extra.endswith(".png"):                        # mask; interpolation: its frames), beside the result
                result.images.append((folder / extra, f"{name}: {label}"))
        for word, map_file in entry.get("maps", {}).items():
            result.maps.append((folder / map_file, f"{word}: {label}"))
        seconds += entry["seconds"]
    animations = sorted(folder.glob("*.gif")) + sorted(folder.glob("*.webp"))
    result.animation = animations[0] if animations else None
    n = len(record["images"])
    result.summary = (f"{n} image{'s' * (n != 1)} on `{record['recipe']['model']}` in {seconds:.1f} s"
                      f" ({record.get('device', '?')}); controls: {', '.join(record['recipe']['controls']) or 'none'}")
    return result
