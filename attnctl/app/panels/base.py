"""A panel: the widgets of one control (or one tool) and how their values become recipe options.

``SchemaPanel`` builds a control's widgets from its ``Options`` schema (see ``attnctl.app.forms``); a control
that needs a better widget registers its own panel, which takes precedence. Panels only describe options and
widgets: generation, validation and errors stay in the library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..forms import Field, fields_of, initial_value, options_from, values_from

if TYPE_CHECKING:
    from ..ui import AppContext

TABS = ("Generate", "Attention maps", "Regions", "Interpolate", "Edit", "Head search")


class Panel:
    """Base class. ``key`` prefixes the panel's API parameter names (``maps__words``)."""

    key: str = ""
    control: str | None = None  # the recipe control this panel edits (None: a tool such as head search)
    tab: str = "Generate"
    title: str = ""
    order: int = 100

    def available(self) -> bool:
        """False when the control it edits is not registered in this installation."""
        if self.control is None:
            return True
        from ...controls import CONTROLS, _load_all

        _load_all()
        return self.control in CONTROLS

    def build(self, ctx: AppContext) -> dict[str, Any]:
        """Create the widgets (inside the current gradio context); return the input components by name."""
        return {}

    def options(self, values: dict[str, Any]) -> dict | list | None:
        """Widget values (by the names ``build`` returned) -> the control's options, or None when it is off."""
        return None

    def fill(self, options: dict | list | None) -> dict[str, Any]:
        """Recipe options (None: control absent) -> widget values by name, for "Load recipe"."""
        return {}

    def check(self, pipe, recipe) -> None:
        """Optional check on the loaded pipeline before generating (raise an AttnctlError)."""

    def wire(self, ctx: AppContext) -> None:
        """Optional: events of the panel's own buttons, once every form input exists (``ctx.form``)."""


class SchemaPanel(Panel):
    """A control's panel generated from its options schema, behind an "enable" checkbox."""

    def __init__(self, control: str, *, tab: str = "Generate", title: str | None = None, order: int = 100,
                 labels: dict[str, str] | None = None, open: bool = False, hidden: tuple[str, ...] = ()):
        self.key = self.control = control
        self.tab, self.order, self.labels, self.open, self.hidden = tab, order, labels or {}, open, hidden
        self.title = title or control

    @property
    def fields(self) -> list[Field]:
        from ...controls import control_class

        return [f for f in fields_of(control_class(self.control).Options) if f.key not in self.hidden]

    def build(self, ctx: AppContext) -> dict[str, Any]:
        import gradio as gr

        from ...controls import control_class

        doc = (control_class(self.control).__doc__ or "").strip().split("\n\n")[0]
        inputs: dict[str, Any] = {}
        with gr.Accordion(self.title, open=self.open, elem_id=f"panel-{self.key}"):
            if doc:
                gr.Markdown(doc)
            inputs["enabled"] = gr.Checkbox(False, label=f"use {self.control}", elem_id=f"{self.key}-enabled")
            for f in self.fields:
                inputs[f.key] = widget(f, ctx, label=self.labels.get(f.key), elem_id=f"{self.key}-{f.key}")
        return inputs

    def options(self, values: dict[str, Any]) -> dict | None:
        if not values.get("enabled"):
            return None
        return options_from(self.fields, values, f"controls.{self.control}")

    def fill(self, options) -> dict[str, Any]:
        from ...errors import RecipeError

        if isinstance(options, list):
            if len(options) != 1:
                raise RecipeError(f"controls.{self.control}: the app edits one {self.control} entry, the recipe "
                                  f"has {len(options)}; run it with `attnctl run`")
            options = options[0]
        return {"enabled": options is not None, **values_from(self.fields, options)}


def widget(f: Field, ctx: AppContext, *, label: str | None = None, elem_id: str | None = None):
    """The gradio component for one form field."""
    import gradio as gr

    label = label or f.label
    info = f.info.split("\n")[0][:200] if f.info else None
    value = initial_value(f)
    common = dict(label=label, info=info, elem_id=elem_id)
    if f.kind == "bool":
        return gr.Checkbox(bool(value), **common)
    if f.kind in ("int", "float") and None not in (f.minimum, f.maximum, value):
        step = 1 if f.kind == "int" else (f.maximum - f.minimum) / 100
        return gr.Slider(f.minimum, f.maximum, value=value, step=step, **common)
    if f.kind in ("int", "float"):
        return gr.Number(value, precision=0 if f.kind == "int" else None, minimum=f.minimum, maximum=f.maximum,
                         **common)
    if f.kind == "choice":
        return gr.Dropdown(list(f.choices), value=value, **common)
    if f.kind == "layers":
        return ctx.layer_selector(value=value, **common)
    if f.kind == "list":
        return gr.Textbox(value, placeholder="comma-separated", **common)
    if f.kind == "yaml":
        return gr.Textbox(value, placeholder="a YAML value, e.g. [0.5, 1.0] or {key: value}", **common)
    return gr.Textbox(value, **common)
