"""The eval frame: suites, side-by-side reports, paired bootstrap, caption-filled control options."""

import json

import numpy as np
import pytest

from attnctl.errors import AttnctlError
from attnctl.evals import get_suite, run_eval
from attnctl.evals.base import paired_bootstrap
from attnctl.evals.presence import subjects_of, triples


def test_paired_bootstrap_brackets_the_mean_difference():
    rng = np.random.default_rng(0)
    base = rng.random(200)
    ctrl = base + 0.1 + 0.01 * rng.standard_normal(200)
    low, high = paired_bootstrap(list(base), list(ctrl))
    assert low < 0.1 < high and high - low < 0.01
    same = paired_bootstrap([0.0, 1.0, 1.0], [0.0, 1.0, 1.0])
    assert same == [0.0, 0.0]


def test_presence_fills_subjects_from_the_caption():
    suite = get_suite("presence")
    case = suite.cases(["a red circle, a blue circle and a green star"], 1)[0]
    assert subjects_of(case.prompt) == ["circle", "circle#2", "star"]
    filled = suite.controls_for({"excite": {"subjects": "auto"}, "maps": {"words": ["red"]}}, case)
    assert filled == {"excite": {"subjects": ["circle", "circle#2", "star"]}, "maps": {"words": ["red"]}}
    given = suite.controls_for({"excite": {"subjects": ["star"]}}, case)
    assert given["excite"]["subjects"] == ["star"]
    assert all(len(t.split(" and ")) == 2 and t.count(",") == 1 for t in triples(5))


def test_unknown_suite_and_empty_prompts_file(tmp_path):
    with pytest.raises(AttnctlError, match="unknown eval suite 'qualty'.*did you mean 'quality'"):
        get_suite("qualty")
    empty = tmp_path / "p.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(AttnctlError, match="has no prompts"):
        run_eval("quality", prompts=str(empty), pipe=object())


def test_presence_report_on_shapes(tmp_path):
    """A control that does not change images (maps) must give identical baseline and controlled metrics."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle and a blue square\n# comment\na green star and a yellow triangle\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prompt: x\nsteps: 8\ncontrols:\n  maps:\n    words: [circle]\n")
    out = tmp_path / "out.json"
    report = run_eval("presence", model="shapes", recipe=str(recipe), prompts=str(prompts), seeds=2,
                      json_path=str(out), progress=False)
    saved = json.loads(out.read_text())
    assert saved["suite"] == "presence" and saved["model"] == "shapes" and saved["n"] == 4
    assert set(saved["baseline"]) == {"all_present", "neglect_rate", "binding_errors"}
    assert saved["controlled"] == saved["baseline"]
    assert all(ci == [0.0, 0.0] for ci in saved["delta_ci95"].values())
    assert [r["prompt"] for r in saved["rows"]][::2] == ["a red circle and a blue square",
                                                         "a green star and a yellow triangle"]
    assert saved["settings"]["steps"] == 8 and report["rows"][0]["baseline"]["status"]


def test_quality_cli_writes_json(tmp_path, capsys):
    from attnctl.cli import main

    out = tmp_path / "q.json"
    assert main(["eval", "quality", "--model", "shapes", "--seeds", "1", "--limit", "6", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 6 and report["controlled"] is None
    assert 0.0 <= report["baseline"]["object_accuracy"] <= 1.0
    assert 0.0 <= report["baseline"]["shape_score"] <= 1.0
    # the graded score is the detector's verdict with margins: an image read right has a positive score, one
    # with nothing in the named colour scores 0
    for row in report["rows"]:
        scored = row["baseline"]
        if scored["object_accuracy"] == 1.0:
            assert scored["shape_score"] > 0.0
        colour = row["prompt"].split()[1]
        if not any(c == colour for c, _ in scored["detections"]):
            assert scored["shape_score"] == 0.0
    assert "object_accuracy" in capsys.readouterr().out


def test_swept_recipe_is_evaluated_at_every_setting_with_one_baseline(tmp_path, monkeypatch):
    """A recipe's sweep is no longer collapsed to its first value: every setting gets its own report, the
    baseline images are generated once per distinct non-control setting, and scale 0 equals the baseline."""
    suite = get_suite("quality")
    calls = []
    real_generate = type(suite).generate

    def counting(self, pipe, settings, cases, controls):
        calls.append((settings.guidance_scale, controls is not None))
        return real_generate(self, pipe, settings, cases, controls)

    monkeypatch.setattr(type(suite), "generate", counting)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prompt: x\nsteps: 4\nguidance_scale: 4.5\ncontrols:\n  perturb:\n"
                      "    layers: [down_blocks.1]\n    scale: [0.0, 4.0]\nsweep: [controls.perturb.scale]\n")
    out = tmp_path / "sweep.json"
    result = run_eval("quality", model="shapes", recipe=str(recipe), seeds=1, limit=3, json_path=str(out),
                      progress=False)
    saved = json.loads(out.read_text())
    assert saved["sweep"] == ["controls.perturb.scale"] and saved["complete"] is True and saved["n"] == 3
    assert [r["setting"] for r in saved["reports"]] == [{"controls.perturb.scale": 0.0},
                                                       {"controls.perturb.scale": 4.0}]
    assert [r["settings"]["controls"]["perturb"]["scale"] for r in result["reports"]] == [0.0, 4.0]
    assert calls == [(4.5, False), (4.5, True), (4.5, True)]  # one baseline for both settings
    off, on = result["reports"]
    assert [r["controlled"] for r in off["rows"]] == [r["baseline"] for r in off["rows"]]
    assert [r["baseline"] for r in off["rows"]] == [r["baseline"] for r in on["rows"]]

    # A swept guidance scale changes the baseline too: one baseline per value.
    calls.clear()
    recipe.write_text("prompt: x\nsteps: 4\nguidance_scale: [3.0, 6.0]\nsweep: [guidance_scale]\n"
                      "controls:\n  perturb:\n    layers: [down_blocks.1]\n    scale: 2.0\n")
    result = run_eval("quality", model="shapes", recipe=str(recipe), seeds=1, limit=2, progress=False)
    assert calls == [(3.0, False), (3.0, True), (6.0, False), (6.0, True)]
    assert [r["settings"]["guidance_scale"] for r in result["reports"]] == [3.0, 6.0]


def test_seed_start_shifts_every_case_and_the_images_follow(tmp_path):
    """``--seed-start N`` draws seeds N, N+1, ...: the same images as the seeds themselves, other than seed 0's."""
    shifted = run_eval("quality", model="shapes", seeds=1, limit=2, seed_start=500, progress=False)
    assert [r["seed"] for r in shifted["rows"]] == [500, 500] and shifted["seeds"] == [500, 500]
    prompts = tmp_path / "p.txt"
    prompts.write_text(shifted["rows"][0]["prompt"] + "\n")
    plain = run_eval("quality", model="shapes", prompts=str(prompts), seeds=1, limit=1, progress=False)
    assert plain["rows"][0]["seed"] == 0
    from attnctl.errors import AttnctlError

    with pytest.raises(AttnctlError, match="seed_start = -1"):
        run_eval("quality", model="shapes", seeds=1, limit=1, seed_start=-1, progress=False)


def test_crowded_suite_has_three_and_four_object_prompts_with_subjects():
    from attnctl.shapes.data import parse_caption

    suite = get_suite("crowded")
    cases = suite.cases(None, 10)
    assert len(cases) == 320
    counts = sorted({len(parse_caption(c.prompt)) for c in cases})
    assert counts == [3, 4]
    four = next(c for c in cases if len(parse_caption(c.prompt)) == 4)
    assert suite.fill("excite", {}, four)["subjects"] == [o["shape"] for o in parse_caption(four.prompt)]
    # Prompts apart from the presence suite's, so a control tuned on one is measured on the other.
    assert not {c.prompt for c in cases} & {c.prompt for c in get_suite("presence").cases(None, 1)}


# -- Attend-and-Excite diagnostics in presence / crowded -----------------------------------------------------
EXCITE_RECIPE = "prompt: x\nsteps: 8\ncontrols:\n  excite:\n    subjects: auto\n    resolution: 16\n"
CROWDED_PROMPTS = "a red circle, a orange square and a purple triangle\na green star, a blue circle and a red square\n"


def test_crowded_report_has_the_weakest_subjects_attention_before_and_after_a_and_e(tmp_path):
    """Every row gets A&E's readings in both runs (the baseline's measured without changing its images), and the
    report their paired summaries; on these prompts A&E raises the weakest subject's attention."""
    recipe, prompts, out = tmp_path / "r.yaml", tmp_path / "p.txt", tmp_path / "out.json"
    recipe.write_text(EXCITE_RECIPE)
    prompts.write_text(CROWDED_PROMPTS)
    report = run_eval("crowded", model="shapes", recipe=str(recipe), prompts=str(prompts), seeds=2,
                      json_path=str(out), progress=False)
    saved = json.loads(out.read_text())
    assert saved["n"] == 4 and saved["excite_attention"] == json.loads(json.dumps(report["excite_attention"]))
    for row in saved["rows"]:
        for run in ("baseline", "controlled"):
            excite = row[run]["excite"]
            assert set(excite) == {"max_attention", "weakest", "weakest_max", "overlap", "refinement_iterations"}
            assert 0.0 <= excite["overlap"] <= 0.5 * 3  # at most 0.5 for each of the three pairs
            assert list(excite["max_attention"]) == subjects_of(row["prompt"])
            assert excite["weakest_max"] == min(excite["max_attention"].values())
            assert excite["max_attention"][excite["weakest"]] == excite["weakest_max"]
            assert 0.0 <= excite["weakest_max"] <= 1.0
        assert row["baseline"]["excite"]["refinement_iterations"] == 0
        # A&E acts on every row: its weakest subject ends the window with more attention than the baseline's.
        assert row["controlled"]["excite"]["weakest_max"] > row["baseline"]["excite"]["weakest_max"]
    block = saved["excite_attention"]
    assert set(block) == {"all", "neglected", "still_neglected", "overlap"}
    assert block["overlap"]["baseline"] == pytest.approx(np.mean([r["baseline"]["excite"]["overlap"]
                                                                  for r in saved["rows"]]))
    every = block["all"]
    assert every["n"] == 4 and every["controlled"] > every["baseline"] and every["delta_ci95"][0] > 0
    base = [r["baseline"]["excite"]["weakest_max"] for r in saved["rows"]]
    assert every["baseline"] == pytest.approx(np.mean(base))
    neglected = [r for r in saved["rows"] if r["baseline"]["neglect_rate"]]
    assert block["neglected"]["n"] == len(neglected)
    assert block["neglected"]["fixed"] == sum(not r["controlled"]["neglect_rate"] for r in neglected)
    assert block["still_neglected"]["n"] == len(neglected) - block["neglected"]["fixed"]

    # The measurement changes no baseline score: a run without it (baseline only) scores the same images alike.
    alone = run_eval("crowded", model="shapes", recipe=str(recipe), prompts=str(prompts), seeds=2,
                     baseline_only=True, progress=False)
    assert "excite_attention" not in alone and all("excite" not in r["baseline"] for r in alone["rows"])
    assert [{k: v for k, v in r["baseline"].items() if k != "excite"} for r in saved["rows"]] == \
           [r["baseline"] for r in alone["rows"]]


def test_excite_measurement_leaves_the_baseline_images_bit_identical():
    from attnctl.evals.base import Settings
    from attnctl.evals.presence import Output
    from attnctl.models import load
    from attnctl.recipe import Recipe

    suite = get_suite("crowded")
    settings = Settings(steps=6, controls={"excite": {"subjects": "auto", "resolution": 16, "scale_factor": 40.0}})
    cases = suite.cases(CROWDED_PROMPTS.splitlines(), 2)
    measuring = suite.baseline_controls(settings, cases)
    assert measuring == {"excite": {"subjects": [subjects_of(c.prompt) for c in cases], "resolution": 16,
                                    "measure_only": True}}  # the update's step size does not change what it reads
    pipe = load("shapes")
    pipe.set_progress_bar_config(disable=True)
    plain = suite.generate(pipe, settings, cases, None)
    measured = suite.generate(pipe, settings, cases, Recipe(prompt="x", controls=measuring).build_controls())
    assert all(isinstance(o, Output) and o.excite["refinement_iterations"] == 0 for o in measured)
    assert [o.excite["subjects"] for o in measured] == [subjects_of(c.prompt) for c in cases]
    for image, output in zip(plain, measured):
        assert image.dtype == output.image.dtype and np.array_equal(image, output.image)
    assert suite.baseline_controls(Settings(controls={"maps": {"words": ["red"]}}), cases) == {}


def test_a_sweep_of_the_excitation_step_size_shares_one_measured_baseline(tmp_path, monkeypatch):
    suite = get_suite("crowded")
    calls = []
    real_generate = type(suite).generate

    def counting(self, pipe, settings, cases, controls):
        calls.append([(c.name, c.options.measure_only) for c in controls or []])
        return real_generate(self, pipe, settings, cases, controls)

    monkeypatch.setattr(type(suite), "generate", counting)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prompt: x\nsteps: 4\ncontrols:\n  excite:\n    subjects: auto\n    resolution: 16\n"
                      "    scale_factor: [10.0, 40.0]\nsweep: [controls.excite.scale_factor]\n")
    result = run_eval("crowded", model="shapes", recipe=str(recipe), seeds=2, limit=2, progress=False)
    assert calls == [[("excite", True)], [("excite", False)], [("excite", False)]]
    assert all(r["excite_attention"]["all"]["n"] == 2 for r in result["reports"])
