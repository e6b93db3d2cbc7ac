"""Panels generated from control option schemas, and the regions panel's boxes (no server needed)."""

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from attnctl.app.forms import fields_of, options_from, values_from
from attnctl.app.panels.regions import format_lines, parse_lines, region_keys
from attnctl.controls import StepWindow, control_class
from attnctl.controls.base import StrictOptions
from attnctl.errors import RecipeError


class Box(BaseModel):
    phrase: str
    box: list[float]


class Options(StrictOptions):
    scale: float = Field(3.0, ge=0.0, le=10.0)
    iterations: int = 5
    mode: Literal["hard", "soft"] = "soft"
    smooth: bool = True
    layers: list[str] | None = Field(None, description="Layer selectors.")
    thresholds: list[float] = Field(default_factory=lambda: [0.05, 0.5])
    strength: float | list[float] = 1.0
    window: StepWindow = Field(default_factory=StepWindow)
    regions: list[Box] = Field(default_factory=list)


def test_every_field_gets_a_widget_kind_and_nested_options_are_flattened():
    kinds = {f.key: f.kind for f in fields_of(Options)}
    assert kinds == {"scale": "float", "iterations": "int", "mode": "choice", "smooth": "bool", "layers": "layers",
                     "thresholds": "list", "strength": "yaml", "window__start": "float", "window__stop": "float",
                     "regions": "yaml"}
    maps = {f.key: f for f in fields_of(control_class("maps").Options)}
    assert maps["words"].required and maps["layers"].kind == "layers" and maps["window__stop"].default == 1.0


def test_only_changed_values_reach_the_options_and_they_round_trip():
    fields = fields_of(Options)
    values = values_from(fields, None)
    assert options_from(fields, values, "controls.x") == {}
    values.update(scale=4.5, mode="hard", thresholds="0.1, 0.7", strength="[0.5, 1.0]", window__stop=0.5,
                  layers=["mid_block:heads=1"], regions="[{phrase: cat, box: [0, 0, 0.5, 1]}]")
    options = options_from(fields, values, "controls.x")
    assert options == {"scale": 4.5, "mode": "hard", "thresholds": [0.1, 0.7], "strength": [0.5, 1.0],
                       "window": {"stop": 0.5}, "layers": ["mid_block:heads=1"],
                       "regions": [{"phrase": "cat", "box": [0, 0, 0.5, 1]}]}
    Options(**options)  # what the form builds is what the control accepts
    assert options_from(fields, values_from(fields, options), "controls.x") == options


def test_bad_form_values_name_the_field():
    fields = fields_of(Options)
    with pytest.raises(RecipeError, match=r"controls\.x\.thresholds = 'a, b': write numbers"):
        options_from(fields, {"thresholds": "a, b"}, "controls.x")
    with pytest.raises(RecipeError, match=r"controls\.x\.strength: not a valid YAML value"):
        options_from(fields, {"strength": "[0.5,"}, "controls.x")


def test_region_boxes_are_found_in_the_schema_and_typed_as_lines():
    assert region_keys(Options) == ("regions", "phrase", "box")
    assert region_keys(control_class("maps").Options) is None
    regions = parse_lines("red circle: 0, 0, 0.5, 0.5\n\n blue square : 0.5,0.5,1,1 ")
    assert regions == [("red circle", [0, 0, 0.5, 0.5]), ("blue square", [0.5, 0.5, 1, 1])]
    assert parse_lines(format_lines(regions)) == regions
    with pytest.raises(RecipeError, match=r"regions line 1 'circle 0 0 1 1': write `phrase: x0, y0, x1, y1`"):
        parse_lines("circle 0 0 1 1")
