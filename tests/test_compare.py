"""Side-by-side runs (``attnctl run --compare``), showcase files of several recipes, and ``--sheet``."""

import json

import pytest
from PIL import Image

from attnctl.cli import main
from attnctl.compare import detector_line, diagnostic_lines
from attnctl.errors import RecipeError
from attnctl.recipe import load_recipe, load_recipes
from attnctl.run import run_recipe

BASE = "model: tiny:sd15\nprompt: [a red circle, a blue square]\nseeds: [0, 1]\nsteps: 2\nheight: 32\nwidth: 32\n"


def _write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_compare_baselines_are_the_plain_pipeline_and_shared_across_a_sweep(tmp_path):
    text = BASE + "controls:\n  perturb: {scale: [0.0, 3.0], targets: [{layers: [mid_block]}]}\nsweep: [controls.perturb.scale]\n"
    recipe = load_recipe(_write(tmp_path, text))
    folder = run_recipe(recipe, out=tmp_path / "runs", progress=False, compare=True)
    record = json.loads((folder / "run.json").read_text())
    assert record["compare_sheets"] == ["compare_set0.png", "compare_set1.png"]
    entries = record["images"]
    assert len(entries) == 8 and all(e["baseline"] for e in entries)
    # One baseline per (prompt, seed), reused by both settings.
    assert len({e["baseline"] for e in entries}) == 4
    assert len(list(folder.glob("baseline_*.png"))) == 4
    by_item = {(e["prompt"], e["seed"], e["setting"]): e for e in entries}
    plain = run_recipe(load_recipe(_write(tmp_path, BASE, "plain.yaml")), out=tmp_path / "plain", progress=False)
    plain_record = json.loads((plain / "run.json").read_text())
    for p in plain_record["images"]:
        base = by_item[(p["prompt"], p["seed"], 0)]["baseline"]
        # The baseline is exactly what the recipe without controls draws ...
        assert Image.open(folder / base).tobytes() == Image.open(plain / p["file"]).tobytes()
        # ... and PAG at scale 0 is the identity, at scale 3 it is not.
        assert Image.open(folder / by_item[(p["prompt"], p["seed"], 0)]["file"]).tobytes() == \
            Image.open(plain / p["file"]).tobytes()
        assert Image.open(folder / by_item[(p["prompt"], p["seed"], 1)]["file"]).tobytes() != \
            Image.open(plain / p["file"]).tobytes()
    sheet = Image.open(folder / "compare_set1.png")
    assert sheet.width > 2 * 128 and sheet.height >= 4 * 128  # a row per item


def test_compare_on_shapes_reads_both_images_with_the_detector(tmp_path):
    text = ("model: shapes\nprompt: a red circle and a blue square\nseeds: [0]\nsteps: 4\nheight: 64\nwidth: 64\n"
            "controls:\n  excite: {subjects: [circle, square]}\n")
    folder = run_recipe(load_recipe(_write(tmp_path, text)), out=tmp_path / "runs", progress=False, compare=True)
    (entry,) = json.loads((folder / "run.json").read_text())["images"]
    for which in ("baseline", "controlled"):
        image = Image.open(folder / (entry["file"] if which == "controlled" else entry["baseline"]))
        assert entry["detector"][which] == detector_line(image, "a red circle and a blue square")
        assert entry["detector"][which].split(" ")[0] in ("0/2", "1/2", "2/2")
    assert Image.open(folder / "compare.png").height >= 128


def test_detector_line_on_a_ground_truth_render():
    from attnctl.shapes.data import Scene, ShapeObject, render

    scene = Scene((ShapeObject("red", "circle", (0.1, 0.1, 0.45, 0.45)),
                   ShapeObject("blue", "square", (0.55, 0.55, 0.9, 0.9))))
    image = render(scene, 64)
    assert detector_line(image, "a red circle and a blue square") == "2/2 present"
    assert detector_line(image, "a red circle and a green star") == "1/2 present: green star neglected"
    assert detector_line(image, "a cat") is None


def test_diagnostic_lines_keep_short_values_only():
    lines = diagnostic_lines({"excite": {"grid": [8, 8], "losses": list(range(50)), "steps": 5, "note": "x" * 80},
                              "perturb": {"scale": 2.0}})
    assert lines[0] == "excite.grid = [8, 8]" and "excite.steps = 5" in lines
    assert "excite.losses = 0 -> 49 (50 values)" in lines and lines[-1] == "perturb.scale = 2"
    assert any(ln.endswith("...") for ln in lines)


def test_compare_without_controls_is_a_clear_error(tmp_path, capsys):
    path = _write(tmp_path, BASE)
    with pytest.raises(RecipeError, match="--compare .*controls: is empty"):
        run_recipe(load_recipe(path), out=tmp_path / "runs", progress=False, compare=True)
    assert not (tmp_path / "runs").exists()  # nothing half-written
    assert main(["run", str(path), "--compare", "--out", str(tmp_path / "cli")]) != 0
    assert "controls: is empty" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


SHOWCASE = (BASE + "controls:\n  maps: {words: [circle]}\n---\n" + BASE.replace("tiny:sd15", "tiny:sd3")
            + "controls:\n  perturb: {scale: 2.0, targets: [{layers: [transformer_blocks.0]}]}\n")


def test_a_showcase_file_runs_each_recipe_into_one_folder(tmp_path, capsys):
    path = _write(tmp_path, SHOWCASE)
    assert [r.model for r in load_recipes(path)] == ["tiny:sd15", "tiny:sd3"]
    with pytest.raises(RecipeError, match="holds 2 recipes"):
        load_recipe(path)  # single-recipe callers (eval, hunt) say so instead of reading one part
    assert main(["run", str(path), "--quiet", "--compare", "--out", str(tmp_path / "runs"),
                 "--sheet", str(tmp_path / "docs" / "sheet.png")]) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    showcase = json.loads((folder / "run.json").read_text())
    assert showcase["status"] == "complete" and showcase["sheet"] == "compare.png"
    assert showcase["parts"] == ["1-tiny_sd15-maps", "2-tiny_sd3-perturb"]
    for part in showcase["parts"]:
        assert json.loads((folder / part / "run.json").read_text())["status"] == "complete"
    stacked = Image.open(folder / "compare.png")
    parts = [Image.open(folder / p / "compare.png") for p in showcase["parts"]]
    assert stacked.height >= sum(p.height for p in parts)
    copied = Image.open(tmp_path / "docs" / "sheet.png")
    assert copied.tobytes() == stacked.tobytes() and "attnctl:sheet" in copied.text
    # A second run may replace the sheet attnctl wrote; never a file it did not write.
    assert main(["run", str(path), "--quiet", "--compare", "--out", str(tmp_path / "runs"),
                 "--sheet", str(tmp_path / "docs" / "sheet.png")]) == 0
    mine = tmp_path / "docs" / "mine.png"
    Image.new("RGB", (4, 4), "red").save(mine)
    before = mine.read_bytes()
    assert main(["run", str(path), "--quiet", "--compare", "--out", str(tmp_path / "runs2"),
                 "--sheet", str(mine)]) != 0
    assert "did not write" in capsys.readouterr().err
    assert mine.read_bytes() == before and not (tmp_path / "runs2").exists()


def test_a_bad_recipe_in_a_showcase_stops_before_anything_runs(tmp_path):
    path = _write(tmp_path, SHOWCASE + "---\n" + BASE + "steps: 0\n")
    with pytest.raises(RecipeError, match="recipe 3 of 3") as err:
        load_recipes(path)
    assert f"{path}:" in str(err.value) and "steps" in str(err.value)
