"""Controls: what to compute. One control per file; each registers itself by name (see ``base.register``)."""

from .base import CONTROLS, Control, StepWindow, control_class, register

# Registry: one line per control module. A new control adds its file and one line here.
_MODULES = (
    "maps",
    "perturb",
    "regions",
    "excite",
    "edit",
    "interpolate",
    "nag",
)


def _load_all() -> None:
    import importlib

    for module in _MODULES:
        importlib.import_module(f"{__name__}.{module}")


__all__ = ["CONTROLS", "Control", "StepWindow", "control_class", "register"]


def __getattr__(name):  # attnctl.controls.Maps etc., loaded on first use
    _load_all()
    for cls in CONTROLS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(name)
