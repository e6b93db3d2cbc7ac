"""App panels: a registry, one module per panel, so each control adds its panel with one line.

``PANELS`` maps a panel key to ``"module:ATTRIBUTE"`` (a ``Panel`` instance). A panel whose ``control`` is set
takes precedence over the generated one for that control; every other registered control gets a
``SchemaPanel`` built from its options schema, so controls that land later appear without app changes.
"""

from __future__ import annotations

import importlib

from .base import TABS, Panel, SchemaPanel

# Registry: one line per panel module.
PANELS = {
    "maps": "attnctl.app.panels.maps:PANEL",
    "regions": "attnctl.app.panels.regions:PANEL",
    "hunt": "attnctl.app.panels.hunt:PANEL",
    "edit": "attnctl.app.panels.edit:PANEL",
}

# Tabs of the generated panels of controls that have no panel of their own.
CONTROL_TABS = {"interpolate": "Interpolate", "regions": "Regions"}


def _load(spec: str) -> Panel:
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def all_panels() -> list[Panel]:
    """Every panel to show: registered panels that are available, then generated ones, in display order."""
    from ...controls import CONTROLS, _load_all

    _load_all()
    panels = [panel for panel in map(_load, PANELS.values()) if panel.available()]
    covered = {panel.control for panel in panels}
    panels += [SchemaPanel(name, tab=CONTROL_TABS.get(name, "Generate")) for name in CONTROLS if name not in covered]
    return sorted(panels, key=lambda panel: (panel.order, panel.key))


__all__ = ["PANELS", "TABS", "Panel", "SchemaPanel", "all_panels"]
