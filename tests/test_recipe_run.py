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
    (GOOD + "stepz: 3\n", r"r.yaml:6: unknown key 'stepz' \(did you mean 'steps'"),
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
    (GOOD + "guidance_scale: [3, -1]\nsweep: [guidance_scale]\n",
     r"r.yaml:7: sweep setting \(guidance_scale=-1\) is invalid: guidance_scale: .*greater than or equal to 0"),
    (GOOD + "sweep: [guidance_scal]\n", r"no 'guidance_scal' \(did you mean 'guidance_scale'\?\)"),
    (GOOD + "sweep: [guidance_scale]\n", r"set guidance_scale: \[...\] in the recipe"),
    (GOOD + "guidance_scale: 3\nsweep: [guidance_scale]\n", r"must be a non-empty list of values \(got 3\)"),
    (GOOD + "sweep: [prompt]\n", r"sweep cannot name 'prompt'"),
    (GOOD + "controls:\n  maps: {words: [red]}\nsweep: {controls.maps.window.stop: [0.5, 2]}\n",
     r"controls.maps.window.stop=2\) is invalid: .*less than or equal to 1"),
    (GOOD + "controls:\n  interpolate: {frames: 3}\n  edit: {}\n",
     r"'interpolate' and 'edit' each produce the whole output .* cannot share one recipe"),
])
def test_bad_recipes(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, text))


def test_sweep_grid_and_list_overrides():
    recipe = load_recipe({"prompt": ["a red circle", "a blue star"], "guidance_scale": [3, 6], "steps": [2, 4],
                          "sweep": ["guidance_scale", "steps"], "controls": {"maps": {"words": ["red"]}}},
                         ["prompt.1=a green square", "controls.maps.words=[green]"])
    assert recipe.settings() == [{"guidance_scale": 3, "steps": 2}, {"guidance_scale": 3, "steps": 4},
                                 {"guidance_scale": 6, "steps": 2}, {"guidance_scale": 6, "steps": 4}]
    last = recipe.at(recipe.settings()[-1])
    assert (last.guidance_scale, last.steps, last.sweep) == (6.0, 4, {})
    assert last.prompts == ["a red circle", "a green square"] and last.controls == {"maps": {"words": ["green"]}}
    from attnctl.run import items_of

    items = items_of(recipe)
    assert len(items) == 8 and [i.index for i in items] == list(range(8))
    assert [i.stem for i in items[:3]] == ["0000_set0_seed0", "0001_set0_seed0", "0002_set1_seed0"]
    mapped = load_recipe({"prompt": "x", "controls": {"maps": {"words": ["x"]}},
                          "sweep": {"controls.maps.window.start": [0.0, 0.5]}})
    assert mapped.at(mapped.settings()[1]).controls["maps"]["window"] == {"start": 0.5}
    with pytest.raises(RecipeError, match=r"'5' is not an index of a list of 2 \(use 0..1\)"):
        load_recipe({"prompt": ["a", "b"]}, ["prompt.5=c"])


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


SWEEP = ("model: tiny:sd15\nprompt: a red circle\nseeds: [0, 1]\nsteps: 2\nheight: 32\nwidth: 32\n"
         "guidance_scale: [3.0, 6.0]\nsweep: [guidance_scale]\ncontrols:\n  maps: {words: [circle]}\n")


def _pixels(folder: Path) -> dict[str, bytes]:
    return {p.name: Image.open(p).tobytes() for p in sorted(folder.glob("0*_seed*.png")) if "_map_" not in p.name}


def test_sweep_run_contact_sheet_and_item_recipes(tmp_path):
    recipe = load_recipe(_write(tmp_path, SWEEP))
    folder = run_recipe(recipe, out=tmp_path / "runs", progress=False)
    record = json.loads((folder / "run.json").read_text())
    assert [(e["file"], e["values"]) for e in record["images"]] == [
        ("0000_set0_seed0.png", {"guidance_scale": 3.0}), ("0001_set0_seed1.png", {"guidance_scale": 3.0}),
        ("0002_set1_seed0.png", {"guidance_scale": 6.0}), ("0003_set1_seed1.png", {"guidance_scale": 6.0})]
    assert record["settings"] == [{"guidance_scale": 3.0}, {"guidance_scale": 6.0}]
    sheet = Image.open(folder / record["contact_sheet"])
    assert sheet.size[0] == 2 * 128 and sheet.size[1] > 2 * 128
    pixels = _pixels(folder)
    assert pixels["0000_set0_seed0.png"] != pixels["0002_set1_seed0.png"]  # the swept value matters
    # Each PNG carries its own item's recipe (its setting, prompt and seed): re-running it reproduces the image.
    text = Image.open(folder / "0002_set1_seed0.png").text["attnctl:recipe"]
    single = load_recipe(_write(tmp_path, text))
    assert single.guidance_scale == 6.0 and not single.sweep and single.seed_list == [0]
    again = run_recipe(single, out=tmp_path / "again", progress=False)
    assert Image.open(again / "0000_seed0.png").tobytes() == pixels["0002_set1_seed0.png"]


def test_each_png_recipe_re_runs_that_one_image(tmp_path):
    """The recipe embedded in a PNG of a multi-prompt, multi-seed run is that image's alone: one prompt, one
    seed, and running it makes the same pixels (not the whole run, whose first image would be another one)."""
    recipe = load_recipe(_write(tmp_path, GOOD.replace("prompt: a red circle", "prompt: [a red circle, a blue star]")
                                + "seeds: [5, 7]\n"))
    folder = run_recipe(recipe, out=tmp_path / "runs", progress=False)
    record = json.loads((folder / "run.json").read_text())
    assert [(e["prompt"], e["seed"]) for e in record["images"]] == [
        ("a red circle", 5), ("a red circle", 7), ("a blue star", 5), ("a blue star", 7)]
    entry = record["images"][3]  # neither the first prompt nor the first seed: a whole-run recipe would differ
    png = Image.open(folder / entry["file"])
    single = load_recipe(_write(tmp_path, png.text["attnctl:recipe"]))
    assert single.prompts == ["a blue star"] and single.seed_list == [7] and not single.sweep
    again = run_recipe(single, out=tmp_path / "again", progress=False)
    (again_entry,) = json.loads((again / "run.json").read_text())["images"]
    assert Image.open(again / again_entry["file"]).tobytes() == png.tobytes()


def test_two_process_sweep_equals_one_process(tmp_path):
    """accelerate with 2 CPU processes: every item exactly once, the same PNGs as a 1-process run."""
    import os
    import subprocess
    import sys

    path = _write(tmp_path, SWEEP)
    one = run_recipe(load_recipe(path), out=tmp_path / "one", progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "attnctl", "run", str(path), "--out", str(tmp_path / "two"),
                           "--quiet", "--distributed", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (two,) = (tmp_path / "two").iterdir()
    record = json.loads((two / "run.json").read_text())
    assert record["status"] == "complete" and record["processes"] == 2
    assert [e["index"] for e in record["images"]] == [0, 1, 2, 3]
    assert sorted(e["process"] for e in record["images"]) == [0, 0, 1, 1]
    assert not list(two.glob("run.rank*.json"))
    assert _pixels(two) == _pixels(one) and len(_pixels(one)) == 4


def test_sweep_has_its_own_progress_bar(tmp_path, capsys):
    recipe = load_recipe({"model": "tiny:sd15", "prompt": "a red circle", "steps": 2, "height": 32, "width": 32,
                          "guidance_scale": [3, 6], "seeds": [0, 1], "sweep": ["guidance_scale"]})
    run_recipe(recipe, out=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "sweep: 100%" in err and "2/2" in err and "guidance_scale=6" in err  # settings bar, with the values
    assert "images: 100%" in err and "4/4" in err
    recipe = load_recipe({"model": "tiny:sd15", "prompt": "a red circle", "steps": 2, "height": 32, "width": 32})
    run_recipe(recipe, out=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "sweep" not in err and "images: 100%" in err  # no sweep: no settings bar


def test_dry_run_into_a_closed_pipe_stops_quietly(tmp_path):
    """`attnctl run R --dry-run | head -1`: no traceback when the reader goes away."""
    import subprocess
    import sys

    path = _write(tmp_path, "model: tiny:sd15\nprompt: a red circle\nseeds: [" + ", ".join(map(str, range(5000))) + "]\n")
    proc = subprocess.Popen([sys.executable, "-m", "attnctl", "run", str(path), "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"recipe ")
    proc.stdout.close()  # far more than a pipe buffer is still to come
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "Error" not in err, err


def test_distributed_inside_a_launched_process_does_not_launch_again(tmp_path, monkeypatch):
    """Under a launcher (WORLD_SIZE set) `--distributed N` is already in effect: the verb runs, it does not
    start another launcher (`--dist 2`, an abbreviation, stays in the children's argv)."""
    import subprocess

    def no_launch(*args, **kwargs):
        raise AssertionError(f"launched again: {args}")

    monkeypatch.setattr(subprocess, "run", no_launch)
    monkeypatch.setenv("WORLD_SIZE", "1")
    path = _write(tmp_path, "model: tiny:sd15\nprompt: a red circle\nsteps: 2\nheight: 32\nwidth: 32\n")
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--quiet", "--dist", "2"]) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert json.loads((folder / "run.json").read_text())["status"] == "complete"


def test_quiet_run_of_the_quickstart_prints_only_its_result(tmp_path):
    """`attnctl run --quiet` in a fresh process: no progress or loading bars, and no notice from transformers
    about torchvision (diffusers' imports triggered two such lines on every run); stdout names the folder."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "attnctl", "run", str(Path(__file__).parent.parent / "recipes" / "quickstart.yaml"),
                           "--quiet", "--out", str(tmp_path), "--set", "steps=2", "--set", "seeds=[0]"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    (folder,) = tmp_path.iterdir()
    assert done.stdout.strip() == f"wrote 3 item(s) to {folder}"


def test_torchvision_notice_is_dropped_and_other_warnings_pass():
    import logging

    from attnctl.cli import quiet_known_notices

    quiet_known_notices()
    quiet_known_notices()  # idempotent
    logger = logging.getLogger("transformers.utils.import_utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `X`")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else"]
    assert sum(type(f).__name__ == "_TorchvisionNotice" for f in logger.filters) == 1
