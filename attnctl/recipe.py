"""Recipes: YAML -> a validated ``Recipe``, with errors that name the file, line, field, value and what is allowed.

YAML is read with the safe loader (no object construction). Controls live under one ``controls:`` key, keyed
by registry name (``maps``, later ``perturb``, ``excite``, ...); each control validates its own options.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .controls.base import StrictOptions, control_class, format_validation_error
from .errors import AttnctlError, RecipeError, did_you_mean
from .models import model_family


class Recipe(StrictOptions):
    """One generation job. Any list-valued ``prompt``/``seeds`` makes one image per (prompt, seed)."""

    model: str = Field("shapes", description="Model string: shapes, shapes-dit, tiny:sd15|sdxl|sd3|flux|flux2|flux2-dev|chroma|qwenimage|zimage, folder or hub id.")
    prompt: str | list[str] = Field(description="Prompt, or a list of prompts (one image per prompt and seed).")
    negative_prompt: str | None = Field(None, description="Negative prompt (pipelines with CFG).")
    seeds: int | list[int] = Field(0, description="Seed or list of seeds.")
    steps: int = Field(25, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(5.0, ge=0.0, le=100.0, description="Classifier-free guidance scale.")
    height: int | None = Field(None, ge=16, le=4096, description="Image height in pixels (default: the model's).")
    width: int | None = Field(None, ge=16, le=4096, description="Image width in pixels (default: the model's).")
    scheduler: str | None = Field(None, description="A diffusers scheduler class name, e.g. DPMSolverMultistepScheduler.")
    scheduler_options: dict[str, Any] = Field(default_factory=dict, description="Options for the scheduler's config.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N.")
    output: str = Field("runs", description="Folder in which each run gets a new subfolder.")
    save_maps: bool = Field(True, description="Save attention-map overlays when a maps control is present.")
    controls: dict[str, dict | list[dict]] = Field(default_factory=dict, description="Controls by registry name.")
    sweep: dict[str, list] = Field(
        default_factory=dict,
        description="Fields that form a grid: a list of dotted paths whose values in the recipe are lists "
                    "(e.g. [guidance_scale, controls.perturb.scale]), or a mapping path -> list of values.")

    @model_validator(mode="before")
    @classmethod
    def _split_sweep(cls, data):
        """Take each swept field's list of values out into ``sweep`` and put its first value in its place, so
        the rest of validation sees one ordinary recipe; every combination is validated after."""
        if not isinstance(data, dict) or not data.get("sweep"):
            return data
        sweep = data["sweep"]
        if isinstance(sweep, str):
            sweep = [sweep]
        data = copy_data(data)
        grid: dict[str, list] = {}
        for path in sweep if isinstance(sweep, (list, dict)) else []:
            if isinstance(path, str) and path.split(".")[0] in ("prompt", "seeds", "sweep"):
                raise ValueError(f"sweep cannot name {path!r}: lists of prompts and seeds already make one "
                                 "image each; sweep other fields (guidance_scale, steps, controls.X.option, ...)")
        if isinstance(sweep, list):
            for path in sweep:
                if not isinstance(path, str):
                    raise ValueError(f"sweep entries are dotted field paths (strings), got {path!r}")
                head = path.split(".")[0]
                if head not in data:
                    known = list(cls.model_fields)
                    hint = (f"; set {head}: [...] in the recipe" if head in known
                            else did_you_mean(head, known) + f"; fields: {', '.join(known)}")
                    raise ValueError(f"sweep names {path!r} but the recipe has no {head!r}{hint}")
                values = get_path(data, path, "sweep")
                if not isinstance(values, list) or not values:
                    raise ValueError(f"sweep names {path!r}, so {path} must be a non-empty list of values "
                                     f"(got {values!r}); e.g. {path}: [1, 2, 3]")
                grid[path] = values
        elif isinstance(sweep, dict):
            for path, values in sweep.items():
                if not isinstance(values, list) or not values:
                    raise ValueError(f"sweep.{path} must be a non-empty list of values, got {values!r}")
                grid[str(path)] = values
        else:
            raise ValueError(f"sweep must be a list of field paths or a mapping path -> values, got {sweep!r}")
        for path, values in grid.items():
            set_path(data, path, values[0], "sweep", create=True)
        data["sweep"] = grid
        return data

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("give at least one non-empty prompt")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        seeds = [value] if isinstance(value, int) else value
        if not seeds or any(s < 0 or s >= 2**63 for s in seeds):
            raise ValueError("seeds must be integers in [0, 2**63)")
        return value

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, value):
        if value is not None and value % 16:
            raise ValueError(f"must be a multiple of 16 (got {value}; try {value // 16 * 16 or 16})")
        return value

    @model_validator(mode="after")
    def _controls_known(self):
        producers = []  # controls that make the whole item themselves (generate_item): at most one per recipe
        family = model_family(self.model)  # None: not known before loading (a hub id); apply says then
        for name, options in self.controls.items():
            cls = control_class(name)  # ControlError with did-you-mean for unknown names
            for index, entry in enumerate(options if isinstance(options, list) else [options]):
                try:
                    parsed = cls.Options(**entry)
                except ValidationError as exc:
                    raise ValueError(format_validation_error(exc, f"controls.{name}", cls.Options)) from None
                if hasattr(cls, "generate_item"):
                    producers.append(name)
                field = f"controls.{name}" + (f".{index}" if isinstance(options, list) else "")
                if family is not None:
                    _check_family(cls, parsed, family, self.model, field)
        if len(producers) > 1:
            raise ValueError(
                f"controls: {' and '.join(repr(p) for p in producers)} each produce the whole output (a sequence, "
                "an edit) and cannot share one recipe; run them as two recipes. They combine with the other "
                "controls (perturb, excite, regions, maps)")
        return self

    @model_validator(mode="after")
    def _sweep_valid(self):
        for setting in self.settings()[1:]:  # the first is the recipe itself, validated already
            try:
                self.at(setting)
            except ValidationError as exc:
                where = ", ".join(f"{k}={v!r}" for k, v in setting.items())
                problems = []
                for e in exc.errors():
                    msg = e["msg"].removeprefix("Value error, ")
                    loc = ".".join(str(x) for x in e["loc"])
                    problems.append(f"{loc}: {msg}" if loc else msg)
                raise ValueError(f"sweep setting ({where}) is invalid: " + "; ".join(problems)) from None
        return self

    def settings(self) -> list[dict[str, Any]]:
        """Every combination of the swept values, as {path: value} (one empty setting when nothing is swept)."""
        if not self.sweep:
            return [{}]
        paths = list(self.sweep)
        return [dict(zip(paths, combo)) for combo in itertools.product(*(self.sweep[p] for p in paths))]

    def at(self, setting: dict[str, Any]) -> "Recipe":
        """The plain recipe (no sweep) of one setting."""
        data = self.model_dump()
        data["sweep"] = {}
        for path, value in setting.items():
            set_path(data, path, value, "sweep", create=True)
        return type(self)(**data)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def seed_list(self) -> list[int]:
        return [self.seeds] if isinstance(self.seeds, int) else list(self.seeds)

    def build_controls(self):
        """Fresh control instances (one set per run: controls hold per-call state)."""
        built = []
        for name, options in self.controls.items():
            cls = control_class(name)
            for entry in options if isinstance(options, list) else [options]:
                built.append(cls(entry))
        return built


def _check_family(cls, options, family: str, model: str, field: str) -> None:
    """A control (or an option of it) the model's family cannot take: the error ``attnctl.apply`` would raise
    after loading the weights, said at validation."""
    if family not in cls.families:
        why = cls.family_notes.get(family)
        raise ValueError(f"{field}: control {cls.name!r} does not support the {family} family of model {model!r} "
                         f"(it supports {', '.join(cls.families)})" + (f": {why}" if why else ""))
    image = getattr(options, "image", None)
    if cls.name == "edit" and image is not None:
        from .adapters import ADAPTERS

        why = ADAPTERS[family].inversion_unsupported
        if why:
            raise ValueError(f"{field}.image = {image!r}: inverting a real image does not support the {family} "
                             f"family of model {model!r}: {why}")


def _line_map(node, path=(), lines=None) -> dict[tuple, int]:
    """Line numbers (1-based) of every key in a composed YAML node tree, by key path."""
    lines = {} if lines is None else lines
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (key.value,)
            lines[sub] = key.start_mark.line + 1
            _line_map(value, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            lines[path + (i,)] = value.start_mark.line + 1
            _line_map(value, path + (i,), lines)
    return lines


def copy_data(data):
    """A deep copy of plain YAML data (dicts, lists, scalars)."""
    if isinstance(data, dict):
        return {k: copy_data(v) for k, v in data.items()}
    if isinstance(data, list):
        return [copy_data(v) for v in data]
    return data


def _step(container, part: str, path: str, where: str):
    if isinstance(container, dict):
        if part not in container:
            raise RecipeError(f"{where} {path!r}: no key {part!r} here" + did_you_mean(part, container)
                              + (f"; keys: {', '.join(map(str, container))}" if container else ""))
        return container[part]
    if isinstance(container, list):
        if not part.lstrip("-").isdigit() or not -len(container) <= int(part) < len(container):
            raise RecipeError(f"{where} {path!r}: {part!r} is not an index of a list of {len(container)} "
                              f"(use 0..{len(container) - 1})")
        return container[int(part)]
    raise RecipeError(f"{where} {path!r}: cannot go into {part!r}, the value there is {container!r}")


def get_path(data: dict, path: str, where: str = "path"):
    """The value at dotted ``path`` (dict keys, or list indices such as ``prompt.1``)."""
    value = data
    for part in path.split("."):
        value = _step(value, part, path, where)
    return value


def set_path(data: dict, path: str, value, where: str = "path", create: bool = False) -> None:
    """Set dotted ``path`` in nested dicts/lists; missing dict keys are created only when ``create``."""
    parts = path.split(".")
    target = data
    for part in parts[:-1]:
        if create and isinstance(target, dict) and part not in target:
            target[part] = {}
        target = _step(target, part, path, where)
    last = parts[-1]
    if isinstance(target, list):
        _step(target, last, path, where)
        target[int(last)] = value
    elif isinstance(target, dict):
        if not create and last not in target:
            _step(target, last, path, where)
        target[last] = value
    else:
        raise RecipeError(f"{where} {path!r}: {'.'.join(parts[:-1])} is {target!r}, not a mapping or list")


def set_override(data: dict, assignment: str) -> None:
    """Apply ``key.sub=value`` (value parsed as YAML) to a recipe dict; list items by index (``prompt.1=...``,
    ``controls.regions.0.phrase=...``)."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: write key=value, e.g. --set steps=10")
    key, _, raw = assignment.partition("=")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {assignment!r}: the value is not valid YAML ({exc})") from None
    set_path(data, key.strip(), value, f"--set {assignment!r}:", create=True)


def _read_documents(path: Path) -> list[tuple[object, dict]]:
    """``(data, line map)`` of every YAML document in ``path`` (a recipe file holds one; a showcase several,
    separated by ``---`` lines)."""
    where = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {where}: {exc.strerror or exc}") from None
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{where}{at}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not docs:
        return [(None, {})]
    return [(data, _line_map(node) if node is not None else {}) for data, node in zip(docs, nodes)]


def load_recipe(source: str | Path | dict, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe from a YAML path or a dict; ``overrides`` are ``key=value`` strings."""
    if isinstance(source, dict):
        return _validate(dict(source), "recipe", {}, overrides)
    docs = _read_documents(Path(source))
    if len(docs) > 1:
        raise RecipeError(f"{source}: holds {len(docs)} recipes (YAML documents separated by ---); give a file "
                          "with one recipe here (attnctl run takes files of several and runs each in turn)")
    return _validate(docs[0][0], str(source), docs[0][1], overrides)


def load_recipes(source: str | Path, overrides: list[str] = ()) -> list[Recipe]:
    """Every recipe of a file of one or more YAML documents (``---`` between them), all validated before any is
    returned; ``overrides`` apply to each. A file of several is a *showcase*: ``attnctl run`` runs each recipe
    into a subfolder of one run folder."""
    docs = _read_documents(Path(source))
    if len(docs) == 1:
        return [_validate(docs[0][0], str(source), docs[0][1], overrides)]
    recipes = []
    for i, (data, lines) in enumerate(docs):
        try:
            recipes.append(_validate(data, str(source), lines, overrides))
        except RecipeError as exc:  # line numbers count from the top of the file; say which recipe too
            raise RecipeError(f"recipe {i + 1} of {len(docs)} in {source}:\n{exc}") from None
    return recipes


def _validate(data, where: str, lines: dict, overrides) -> Recipe:
    """A validated ``Recipe`` from YAML data; errors name the file, line, field, value and what is allowed."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys (model:, prompt:, ...), got {type(data).__name__}")
    for assignment in overrides:
        set_override(data, assignment)
    try:
        return Recipe(**data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
            at = f"{where}:{line}" if line else where
            field = ".".join(str(x) for x in loc) or "(top level)"
            if not loc:  # whole-recipe checks (sweep): the message names the fields itself
                msg = err["msg"].removeprefix("Value error, ")
                line = lines.get(("sweep",)) if "sweep" in msg else None
                if msg.startswith("controls."):  # a control's own problem: the line of its key
                    parts = msg.split(":", 1)[0].split(" ", 1)[0].split(".")
                    at_path = ("controls", parts[1]) + tuple(int(p) if p.isdigit() else p for p in parts[2:3])
                    line = lines.get(at_path, lines.get(at_path[:2]))
                problems.append(f"{where}:{line}: {msg}" if line else f"{where}: {msg}")
            elif err["type"] == "extra_forbidden":
                key = str(loc[-1])
                problems.append(f"{at}: unknown key {key!r}{did_you_mean(key, Recipe.model_fields)}; allowed: "
                                f"{', '.join(Recipe.model_fields)}")
            elif err["type"] == "missing":
                problems.append(f"{at}: missing required key {field!r}")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                problems.append(f"{at}: {field} = {err.get('input')!r}: {msg}")
        raise RecipeError("\n".join(problems)) from None
    except AttnctlError as exc:  # unknown control names raise from inside validation
        raise RecipeError(f"{where}: {exc}") from None


def json_schema() -> dict:
    """The recipe schema as JSON Schema (for editors); control options are listed under ``$defs``."""
    from .controls import CONTROLS, _load_all

    _load_all()
    schema = Recipe.model_json_schema()
    schema.setdefault("$defs", {})
    properties = {}
    for name, cls in CONTROLS.items():
        sub = cls.Options.model_json_schema()
        schema["$defs"].update(sub.pop("$defs", {}))
        sub["x-attnctl-families"] = list(cls.families)  # validation refuses a model of any other family
        sub["description"] = (sub.get("description", "").rstrip() + " " if sub.get("description") else "") + (
            f"Families: {', '.join(cls.families)}.")
        schema["$defs"][f"control_{name}"] = sub
        properties[name] = {"anyOf": [{"$ref": f"#/$defs/control_{name}"},
                                      {"type": "array", "items": {"$ref": f"#/$defs/control_{name}"}}]}
    schema["properties"]["controls"] = {"type": "object", "properties": properties, "additionalProperties": False}
    return schema
