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
    assert "object_accuracy" in capsys.readouterr().out
