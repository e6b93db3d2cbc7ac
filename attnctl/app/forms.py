"""Control options <-> form fields, derived from each control's pydantic ``Options`` JSON schema (no gradio here).

A control that lands later gets a working panel without app changes: every schema property becomes one
``Field`` (nested objects such as ``window: StepWindow`` become ``window.start`` / ``window.stop``). Simple
types get simple widgets; anything the form cannot express one-to-one (unions, lists of objects) is edited as a
YAML value, which the library then validates like any recipe. Only values that differ from the schema default
go into the recipe, so a downloaded recipe says what the user changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import RecipeError

# Widget kinds: bool, int, float, choice, text, list (comma-separated), layers (selector list), yaml.
LAYER_FIELD_NAMES = frozenset({"layers", "targets", "heads", "sites"})
_ABSENT = object()


@dataclass(frozen=True)
class Field:
    """One form field of a control's options. ``path`` is the key path inside the options dict."""

    path: tuple[str, ...]
    kind: str
    label: str
    info: str = ""
    default: Any = None
    has_default: bool = False
    required: bool = False
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple = ()
    item_type: str = "string"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        """A Python identifier for this field (used in API parameter names): ``window__start``."""
        return "__".join(self.path)


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        merged = dict(root.get("$defs", {}).get(name, {}))
        merged.update({k: v for k, v in schema.items() if k != "$ref"})
        schema = merged
    return schema


def _kind(schema: dict, name: str) -> tuple[str, dict]:
    """Widget kind of a (resolved, non-null) property schema, plus details (bounds, choices, item type)."""
    if "enum" in schema:
        return "choice", {"choices": tuple(schema["enum"])}
    if "const" in schema:
        return "choice", {"choices": (schema["const"],)}
    kind = schema.get("type")
    bounds = {"minimum": schema.get("minimum", schema.get("exclusiveMinimum")),
              "maximum": schema.get("maximum", schema.get("exclusiveMaximum"))}
    if kind == "boolean":
        return "bool", {}
    if kind == "integer":
        return "int", bounds
    if kind == "number":
        return "float", bounds
    if kind == "string":
        return "text", {}
    if kind == "array":
        items = schema.get("items", {})
        item_type = items.get("type")
        if item_type in ("string", "integer", "number") and "enum" not in items:
            selector = "selector" in schema.get("description", "").lower() or name in LAYER_FIELD_NAMES
            return ("layers" if selector and item_type == "string" else "list"), {"item_type": item_type}
    return "yaml", {}


def fields_of(options_model) -> list[Field]:
    """The form fields of a pydantic options class, in declaration order."""
    root = options_model.model_json_schema()
    return _fields(root, root, ())


def _fields(schema: dict, root: dict, prefix: tuple[str, ...]) -> list[Field]:
    out: list[Field] = []
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        prop = _resolve(prop, root)
        variants = [_resolve(v, root) for v in prop.get("anyOf", prop.get("oneOf", []))]
        nullable = any(v.get("type") == "null" for v in variants)
        non_null = [v for v in variants if v.get("type") != "null"]
        if variants and len(non_null) == 1:
            inner = dict(non_null[0])
            inner.setdefault("description", prop.get("description", ""))
        elif variants:
            inner = {"anyOf": non_null}
        else:
            inner = prop
        path = prefix + (name,)
        if inner.get("type") == "object" and "properties" in inner:
            out += _fields(inner, root, path)  # nested options (e.g. a StepWindow): one field per leaf
            continue
        kind, details = _kind(inner, name)
        label = " / ".join(p.replace("_", " ") for p in path)
        out.append(Field(path=path, kind=kind, label=label, info=prop.get("description", ""),
                         default=prop.get("default"), has_default="default" in prop,
                         required=name in required and not prefix, nullable=nullable, **details))
    return out


# -- values <-> options -------------------------------------------------------------------------------------
def widget_value(f: Field, value: Any) -> Any:
    """An options value -> the value its widget shows (``None``: the widget's empty state)."""
    if value is None:
        return [] if f.kind == "layers" else ("" if f.kind in ("text", "list", "yaml") else None)
    if f.kind == "list":
        return ", ".join(str(v) for v in (value if isinstance(value, list) else [value]))
    if f.kind == "layers":
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if f.kind == "yaml":
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return value


def initial_value(f: Field) -> Any:
    return widget_value(f, f.default if f.has_default else None)


def option_value(f: Field, shown: Any, where: str) -> tuple[bool, Any]:
    """A widget value -> ``(present, value)`` for the options dict; empty widgets are left to the default."""
    if shown is None or (isinstance(shown, (str, list)) and not (shown.strip() if isinstance(shown, str) else shown)):
        return False, None
    if f.kind == "int":
        if float(shown) != int(shown):
            raise RecipeError(f"{where}.{'.'.join(f.path)} = {shown!r}: must be a whole number")
        return True, int(shown)
    if f.kind == "float":
        return True, float(shown)
    if f.kind == "list":
        parts = [p.strip() for p in str(shown).split(",") if p.strip()]
        if f.item_type in ("integer", "number"):
            try:
                parts = [int(p) if f.item_type == "integer" else float(p) for p in parts]
            except ValueError:
                raise RecipeError(f"{where}.{'.'.join(f.path)} = {shown!r}: write numbers separated by commas")
        return bool(parts), parts
    if f.kind == "layers":
        return True, [str(v) for v in shown]
    if f.kind == "yaml":
        try:
            return True, yaml.safe_load(shown)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{where}.{'.'.join(f.path)}: not a valid YAML value ({exc})") from None
    return True, shown


def options_from(fields: list[Field], values: dict[str, Any], where: str) -> dict:
    """Widget values keyed by ``Field.key`` -> a nested options dict holding only non-default values."""
    options: dict = {}
    for f in fields:
        present, value = option_value(f, values.get(f.key), where)
        if not present or (f.has_default and value == f.default and not f.required):
            continue
        target = options
        for part in f.path[:-1]:
            target = target.setdefault(part, {})
        target[f.path[-1]] = value
    return options


def values_from(fields: list[Field], options: dict | None) -> dict[str, Any]:
    """A (possibly partial) options dict -> widget values keyed by ``Field.key``; absent keys show defaults."""
    out = {}
    for f in fields:
        node: Any = options or {}
        for part in f.path:
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        out[f.key] = initial_value(f) if node is _ABSENT else widget_value(f, node)
    return out
