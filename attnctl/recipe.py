"""Recipes: YAML -> a validated ``Recipe``, with errors that name the file, line, field, value and what is allowed.

YAML is read with the safe loader (no object construction). Controls live under one ``controls:`` key, keyed
by registry name (``maps``, later ``perturb``, ``excite``, ...); each control validates its own options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .controls.base import StrictOptions, control_class, format_validation_error
from .errors import AttnctlError, RecipeError, did_you_mean


class Recipe(StrictOptions):
    """One generation job. Any list-valued ``prompt``/``seeds`` makes one image per (prompt, seed)."""

    model: str = Field("shapes", description="Model string: shapes, shapes-dit, tiny:sd15|sdxl|sd3|flux, folder or hub id.")
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
        for name, options in self.controls.items():
            cls = control_class(name)  # ControlError with did-you-mean for unknown names
            for entry in options if isinstance(options, list) else [options]:
                try:
                    cls.Options(**entry)
                except ValidationError as exc:
                    raise ValueError(format_validation_error(exc, f"controls.{name}", cls.Options)) from None
        return self

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


def set_override(data: dict, assignment: str) -> None:
    """Apply ``key.sub=value`` (value parsed as YAML) to a recipe dict."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: write key=value, e.g. --set steps=10")
    key, _, raw = assignment.partition("=")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {assignment!r}: the value is not valid YAML ({exc})") from None
    target = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise RecipeError(f"--set {assignment!r}: {part} is not a mapping")
    target[parts[-1]] = value


def load_recipe(source: str | Path | dict, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe from a YAML path or a dict; ``overrides`` are ``key=value`` strings."""
    where, lines = "recipe", {}
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {where}: {exc.strerror or exc}") from None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f":{mark.line + 1}" if mark is not None else ""
            raise RecipeError(f"{where}{at}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        lines = _line_map(node) if node is not None else {}
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
            if err["type"] == "extra_forbidden":
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
        schema["$defs"][f"control_{name}"] = sub
        properties[name] = {"anyOf": [{"$ref": f"#/$defs/control_{name}"},
                                      {"type": "array", "items": {"$ref": f"#/$defs/control_{name}"}}]}
    schema["properties"]["controls"] = {"type": "object", "properties": properties, "additionalProperties": False}
    return schema
