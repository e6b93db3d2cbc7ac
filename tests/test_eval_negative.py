"""``attnctl eval negative``: the detector rules on rendered ground truth, the cases, the control's negative per
case, and the suite end to end on the embedded model (a few images)."""

import json

import numpy as np
import pytest

from attnctl.errors import AttnctlError
from attnctl.evals import get_suite, run_eval
from attnctl.evals.base import paired_bootstrap_relative_cut
from attnctl.evals.negative import (CASES, CONCEPTS, MIN_ROWS, parse_line, positive_accuracy,
                                    positive_recall, shows)
from attnctl.shapes.data import Scene, ShapeObject, make_dataset, render
from attnctl.shapes.detect import detect


def scene(*objects) -> np.ndarray:
    """Render (colour, shape, box) objects as a 64x64 image."""
    return np.asarray(render(Scene(tuple(ShapeObject(c, s, b) for c, s, b in objects))))


LEFT, RIGHT = (0.08, 0.3, 0.42, 0.64), (0.56, 0.3, 0.9, 0.64)


def test_shows_negative_on_rendered_scenes():
    dets = detect(scene(("blue", "square", LEFT), ("red", "circle", RIGHT)))
    assert {c for c in CONCEPTS if shows(dets, c)} == {"blue", "square", "red", "circle"}
    # A colour concept is that colour in any shape, a shape concept that shape in any colour.
    dets = detect(scene(("purple", "star", LEFT)))
    assert shows(dets, "purple") and shows(dets, "star")
    assert not any(shows(dets, c) for c in ("blue", "red", "circle", "square", "triangle"))
    assert not any(shows(detect(scene()), c) for c in CONCEPTS)  # an empty canvas shows nothing
    with pytest.raises(AttnctlError, match="'pink' is not a ShapesWorld colour or shape; allowed: red"):
        shows(dets, "pink")


def test_shows_negative_agrees_with_ground_truth_scenes():
    """Over 120 rendered scenes of 1-4 objects, the rule reads every concept of the truth and no other."""
    images, _, scenes = make_dataset(120, seed=2222, max_objects=4)
    agree = []
    for image, truth in zip(images, scenes):
        present = {o.colour for o in truth.objects} | {o.shape for o in truth.objects}
        dets = detect(image)
        agree += [shows(dets, c) == (c in present) for c in CONCEPTS]
    assert np.mean(agree) >= 0.995


def test_positive_accuracy_on_rendered_scenes():
    both = detect(scene(("red", "circle", LEFT), ("blue", "square", RIGHT)))
    assert positive_accuracy("a red circle and a blue square", both) == 1.0
    assert positive_accuracy("a red circle", both) == 1.0  # extra objects do not count against the prompt
    one = detect(scene(("red", "circle", LEFT), ("purple", "square", RIGHT)))
    assert positive_accuracy("a red circle and a blue square", one) == 0.0  # the square in the wrong colour
    assert positive_recall("a red circle and a blue square", one) == 0.5
    assert positive_recall("a red circle and a blue square", both) == 1.0 and positive_recall("", one) == 1.0
    assert positive_accuracy("", one) == 1.0 and positive_accuracy("", detect(scene())) == 0.0


def test_prompts_lines_and_their_errors():
    assert parse_line("a red circle and a blue square | Star") == ("a red circle and a blue square", "star")
    assert parse_line("| circle") == ("", "circle")
    with pytest.raises(AttnctlError, match="names the negative concept 'blue'"):
        parse_line("a red circle and a blue square | blue", "--prompts line 3")
    with pytest.raises(AttnctlError, match="--prompts line 2: .*'PROMPT \\| NEGATIVE'.*allowed negatives: red"):
        parse_line("a red circle", "--prompts line 2")
    with pytest.raises(AttnctlError, match="'pink' is not a ShapesWorld colour or shape"):
        parse_line("a red circle | pink")
    with pytest.raises(AttnctlError, match="prompt 'a red thing'.*does not name a colour"):
        parse_line("a red thing | star")


def test_built_in_cases_leave_their_negative_open_and_fill_the_control():
    suite = get_suite("negative")
    for model in ("shapes", "shapes-dit"):
        assert CASES[model], model
        cases = suite.cases_for(None, None, model)
        assert len(cases) >= MIN_ROWS
        for case in cases[:: max(1, len(cases) // 40)]:
            parse_line(f"{case.prompt} | {case.info['negative']}")  # parses, and leaves the negative open
    case = suite.cases_for(None, 2, "assets/shapes-dit")[0]
    assert suite.controls_for({"nag": {"negative_prompt": "auto", "scale": 2.0}}, case) == \
        {"nag": {"negative_prompt": case.info["negative"], "scale": 2.0}}
    assert suite.fill("nag", {"negative_prompt": "a {concept}"}, case)["negative_prompt"] == \
        f"a {case.info['negative']}"
    with pytest.raises(AttnctlError, match="controls.nag.negative_prompt = 'blue'.*allowed: 'auto'"):
        suite.fill("nag", {"negative_prompt": "blue"}, case)
    with pytest.raises(AttnctlError, match="no built-in cases for model 'my-model'.*--prompts"):
        suite.cases_for(None, 1, "my-model")


def test_relative_cut_interval():
    base = [1.0] * 100 + [0.0] * 100
    ctrl = [1.0] * 50 + [0.0] * 150  # half the images that showed it no longer do
    low, high = paired_bootstrap_relative_cut(base, ctrl)
    assert low < 0.5 < high and high - low < 0.3
    assert all(np.isnan(paired_bootstrap_relative_cut([0.0, 0.0], [0.0, 1.0])))  # undefined without a baseline


def test_suite_end_to_end_on_shapes(tmp_path):
    """No recipe: guidance 1 and NAG's defaults with each case's concept as its negative; two images per run."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("| circle\na red circle and a blue square | star\n")
    out = tmp_path / "neg.json"
    report = run_eval("negative", model="shapes", prompts=str(prompts), seeds=1, json_path=str(out), progress=False)
    saved = json.loads(out.read_text())
    assert saved["suite"] == "negative" and saved["n"] == 2 and saved["recipe"] is None
    assert saved["settings"]["guidance_scale"] == 1.0
    assert saved["settings"]["controls"] == {"nag": {"negative_prompt": "auto"}}
    assert set(saved["baseline"]) == {"shows_negative", "positive_accuracy", "positive_recall"}
    assert [(c["prompt"], c["negative"], c["n"]) for c in saved["per_case"]] == \
        [("", "circle", 1), ("a red circle and a blue square", "star", 1)]
    for row in saved["rows"]:
        for key in ("baseline", "controlled"):
            dets = [tuple(d) for d in row[key]["detections"]]
            assert row[key]["shows_negative"] == float(any(row["info"]["negative"] in d for d in dets))
    assert set(saved["targets"]) == {"relative_cut", "positive_accuracy_delta"}
    assert set(saved["by_kind"]) == {"shape concept", "empty prompt", "objects prompt"}
    assert report["delta_ci95"]["shows_negative"] == saved["delta_ci95"]["shows_negative"]

    # NAG at scale 0 is no guidance: the controlled images are the baseline's.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prompt: x\nsteps: 6\ncontrols:\n  nag:\n    negative_prompt: auto\n    scale: 0.0\n")
    off = run_eval("negative", model="shapes", recipe=str(recipe), prompts=str(prompts), seeds=1, progress=False)
    assert off["settings"]["guidance_scale"] == 1.0 and off["settings"]["steps"] == 6
    assert all(r["controlled"] == r["baseline"] for r in off["rows"])
    assert off["delta_ci95"]["shows_negative"] == [0.0, 0.0]


def test_cli_runs_the_built_in_cases(tmp_path, capsys):
    from attnctl.cli import main

    out = tmp_path / "n.json"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prompt: x\nsteps: 4\nguidance_scale: 2.0\ncontrols:\n  nag: {negative_prompt: auto}\n")
    assert main(["eval", "negative", "--model", "shapes", "--recipe", str(recipe), "--seeds", "1", "--limit", "2",
                 "--seed-start", "1000", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 2 and report["settings"]["guidance_scale"] == 2.0 and report["seeds"] == [1000, 1000]
    assert [(r["prompt"], r["info"]["negative"]) for r in report["rows"]] == list(CASES["shapes"][:2])
    printed = capsys.readouterr().out
    assert "shows_negative" in printed and "relative_cut" in printed


def test_summary_per_case_relative_cut_and_targets():
    suite = get_suite("negative")

    def row(prompt, negative, shown, ctrl_shown, acc=1.0, ctrl_acc=1.0):
        info = {"negative": negative, "kind": "shape", "prompt_kind": "empty" if not prompt else "objects"}
        return {"prompt": prompt, "seed": 0, "info": info,
                "baseline": {"shows_negative": shown, "positive_accuracy": acc, "positive_recall": acc},
                "controlled": {"shows_negative": ctrl_shown, "positive_accuracy": ctrl_acc,
                               "positive_recall": ctrl_acc}}

    rows = [row("", "star", 1.0, 0.0), row("", "star", 1.0, 1.0), row("a red circle", "star", 0.0, 0.0),
            row("a red circle", "star", 0.0, 0.0, acc=1.0, ctrl_acc=0.0)]
    out = suite.summary(rows, controlled=True)
    assert out["relative_cut"]["value"] == 0.5
    assert [(c["prompt"], c["n"], c["baseline"]["shows_negative"], c["controlled"]["shows_negative"])
            for c in out["per_case"]] == [("", 2, 1.0, 0.5), ("a red circle", 2, 0.0, 0.0)]
    assert out["by_kind"]["objects prompt"]["controlled"]["positive_accuracy"] == 0.5
    assert out["targets"]["relative_cut"]["met"] is True
    assert out["targets"]["positive_accuracy_delta"]["value"] == -0.25
    assert out["targets"]["positive_accuracy_delta"]["met"] is False
    # A baseline that never shows the negative: the cut is undefined, written as null (valid JSON), never met.
    none = suite.summary([row("", "star", 0.0, 1.0)], controlled=True)
    assert none["relative_cut"] == {"value": None, "ci95": [None, None]}
    assert none["targets"]["relative_cut"]["met"] is False
    json.dumps(none, allow_nan=False)
    assert "relative_cut: - [-, -]" in "\n".join(suite.summary_lines({"controlled": {}, **none}))
    assert "per_case" in suite.summary(rows, controlled=False) and "targets" not in suite.summary(rows, False)


def test_calibration_reports_every_concept_and_picks_open_ones(tmp_path):
    from attnctl.evals.negative import SELECT, calibrate

    out = tmp_path / "cal.json"
    report = calibrate("shapes", seeds=2, seed_start=50_000, prompts=("", "a red circle"), steps=4,
                       json_path=str(out), progress=False)
    assert json.loads(out.read_text()) == report and report["seeds"] == [50_000, 50_001]
    assert report["guidance_scale"] == 1.0 and [p["prompt"] for p in report["prompts"]] == ["", "a red circle"]
    assert all(set(p["shares"]) == set(CONCEPTS) for p in report["prompts"])
    for c in report["candidates"]:
        share = next(p for p in report["prompts"] if p["prompt"] == c["prompt"])["shares"][c["negative"]]
        assert SELECT[0] <= share == c["share"] <= SELECT[1]
        assert not (c["prompt"] == "a red circle" and c["negative"] in ("red", "circle"))
    with pytest.raises(AttnctlError, match="seeds = 0"):
        calibrate("shapes", seeds=0)
