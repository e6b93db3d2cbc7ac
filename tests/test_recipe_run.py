"""Recipes: validation errors (file, line, field, allowed values), the runner, and every shipped recipe."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attnctl.cli import main
from attnctl.errors import RecipeError
from attnctl.recipe import json_schema, load_recipe
from attnctl.run import run_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
GOOD = "model: tiny:sd15\nprompt: a red circle\nsteps: 2\nheight: 32\nwidth: 32\n"


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    (GOOD + "stepz: 3\n", r"r.yaml:6: unknown key 'stepz' \(did you mean 'steps'\?\)"),
    (GOOD.replace("steps: 2", "steps: -1"), r"r.yaml:3: steps = -1: .*greater than or equal to 1"),
    (GOOD.replace("steps: 2", "steps: many"), r"r.yaml:3: steps = 'many'"),
    (GOOD.replace("height: 32", "height: 33"), r"r.yaml:4: height = 33: must be a multiple of 16"),
    (GOOD + "controls:\n  mapz: {words: [red]}\n", r"unknown control 'mapz'.*did you mean 'maps'"),
    (GOOD + "controls:\n  maps: {wordz: [red]}\n", r"unknown key 'wordz'"),
    (GOOD + "controls:\n  maps: {words: []}\n", r"words"),
    (GOOD + "controls:\n  maps: {words: [red], window: {start: 0.8, stop: 0.2}}\n", r"must be >= start"),
    (GOOD + "seeds: [-1]\n", r"seeds"),
    (GOOD + "prompt: ''\n", r"non-empty prompt"),
    ("model: tiny:sd15\n", r"missing required key 'prompt'"),
    ("- just\n- a list\n", r"a recipe is a mapping"),
    ("prompt: [unclosed\n", r"r.yaml:2: not valid YAML"),
    ("prompt: !!python/object/apply:os.system ['echo hi']\n", r"not valid YAML"),
    (GOOD + "dtype: float8\n", r"dtype = 'float8'"),
    (GOOD + "guidance_scale: 1000\n", r"guidance_scale"),
])
def test_bad_recipes(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, text))


def test_bad_overrides_and_files(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(RecipeError, match="write key=value"):
        load_recipe(path, ["steps"])
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    assert load_recipe(path, ["steps=7", "controls.maps.words=[red]"]).steps == 7


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["model", "prompt", "seeds", "steps", "height", "controls", "typo",
                                        "guidance_scale", "dtype"]),
                       st.one_of(st.none(), st.integers(-5, 5000), st.text(max_size=8), st.floats(allow_nan=True),
                                 st.lists(st.integers(-3, 3), max_size=3),
                                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))))
def test_random_recipes_only_raise_recipe_errors(data):
    try:
        load_recipe(data)
    except RecipeError:
        pass


def test_run_writes_images_metadata_and_is_reproducible(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD + "seeds: [3, 4]\ncontrols:\n  maps: {words: [circle]}\n"))
    first = run_recipe(recipe, out=tmp_path / "runs", progress=False)
    second = run_recipe(recipe, out=tmp_path / "runs", progress=False)
    assert first != second  # a new folder per run, never overwritten
    record = json.loads((first / "run.json").read_text())
    assert record["status"] == "complete" and len(record["images"]) == 2
    image = Image.open(first / record["images"][0]["file"])
    assert image.text["attnctl:seed"] == "3" and "tiny:sd15" in image.text["attnctl:recipe"]
    assert (first / record["images"][0]["maps"]["circle"]).is_file()
    for entry in record["images"]:
        a = Image.open(first / entry["file"]).tobytes()
        b = Image.open(second / entry["file"]).tobytes()
        assert a == b  # bit-for-bit on CPU


def test_missing_word_is_reported(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD + "prompt: [a red circle, a dog]\ncontrols:\n  maps: {words: [red]}\n"))
    folder = run_recipe(recipe, out=tmp_path / "runs", progress=False)  # 'red' missing in prompt 2: reported
    record = json.loads((folder / "run.json").read_text())
    assert record["images"][1]["diagnostics"]["maps"]["missing"] == [{"prompt": "a dog", "word": "red"}]
    assert "maps" not in record["images"][1] or "red" not in record["images"][1]["maps"]


def test_failed_run_leaves_valid_run_json(tmp_path):
    from attnctl.errors import SelectorError

    recipe = load_recipe(_write(tmp_path, GOOD + "controls:\n  maps: {words: [red], layers: [up_blocks.9]}\n"))
    with pytest.raises(SelectorError):
        run_recipe(recipe, out=tmp_path / "runs", progress=False)
    (folder,) = (tmp_path / "runs").iterdir()
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "failed" and "up_blocks.9" in record["error"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_runs(path, tmp_path):
    assert main(["run", str(path), "--quiet", "--out", str(tmp_path), "--set", "steps=2",
                 "--set", "seeds=[0]"]) == 0
    (folder,) = tmp_path.iterdir()
    assert json.loads((folder / "run.json").read_text())["status"] == "complete"


def test_schema_and_dry_run(capsys):
    schema = json_schema()
    assert "maps" in schema["properties"]["controls"]["properties"]
    assert main(["run", str(RECIPES[0]), "--dry-run"]) == 0
    assert "is valid" in capsys.readouterr().out
