"""``attnctl bench pipeline``'s defaults: every (family, setting) it plans can run. Nothing here times anything:
the plan is checked without running it, and one smoke run at the quick size (32 px, 2 steps, 1 repeat)
checks that a setting a family cannot take is skipped with a note."""

import json
import subprocess

import pytest

from attnctl.bench import pipeline
from attnctl.bench.overhead import FAMILIES
from attnctl.cli import main
from attnctl.controls.nag import Nag
from attnctl.errors import AttnctlError

NAG_FAMILIES = [f for f in FAMILIES if pipeline.MODEL_FAMILY.get(f, f) in Nag.families]


def test_the_bare_command_plans_only_settings_each_family_can_take(capsys):
    jobs = pipeline.plan(None, None, interleave=False)
    assert {family for family, _ in jobs} == set(FAMILIES)
    for family, names in jobs:
        for name in names:
            assert pipeline.applies(name, family), (family, name)
    planned = {(family, name) for family, names in jobs for name in names}
    assert ("sd15", "diffusers-excite") in planned and ("sd15", "cfg+excite") in planned
    assert not any(name == "diffusers-excite" and family != "sd15" for family, name in planned)
    assert all((family, "cfg") in planned for family in FAMILIES)
    # NAG runs where the control does: on every benchmark family; its whole-block reference on three of them
    assert {family for family, name in planned if name == "nag"} == set(NAG_FAMILIES) == set(FAMILIES)
    assert {family for family, name in planned if name == "nag[whole-block]"} == {"sd3", "flux", "shapes-dit"}
    err = capsys.readouterr().err
    for family in FAMILIES:
        if family != "sd15":
            assert f"skipping diffusers-excite on {family}: it runs on sd15 only" in err
        if family not in ("sd3", "flux", "shapes-dit"):
            assert f"skipping nag[whole-block] on {family}: it runs on sd3, flux, shapes-dit only" in err


@pytest.mark.parametrize("families", [["qwenimage"], ["flux2", "chroma"], ["sdxl", "shapes-dit"]])
def test_families_without_sd15_plan_the_default_settings_with_notes(families, capsys):
    jobs = pipeline.plan(families, None, interleave=False)
    planned = {(family, name) for family, names in jobs for name in names}
    assert {family for family, _ in planned} == set(families)
    assert all((family, "cfg") in planned and (family, "cfg+pag") in planned for family in families)
    assert not any(name == "diffusers-excite" for _, name in planned)
    assert all(pipeline.applies(name, family) for family, name in planned)
    err = capsys.readouterr().err
    assert f"skipping diffusers-excite: it runs on sd15 only, none of the chosen families {', '.join(families)}" in err


def test_cli_families_qwenimage_without_settings_plans_and_notes(monkeypatch, capsys):
    """`attnctl bench pipeline --families qwenimage --quick`: the processes it would start, none started."""
    started = []

    def fake_run(cmd, **kwargs):
        family, names = cmd[cmd.index("--family") + 1], cmd[cmd.index("--settings") + 1].split(",")
        started.append((family, names, "--quick" in cmd))
        rows = [{"family": family, "setting": n, "seconds_per_image": 1.0, "min_s": 1.0, "max_s": 1.0,
                 "peak_mem_mb": 0.0, "size": "32x32", "steps": 2, "runs": 1} for n in names]
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(rows) + "\n", stderr="")

    monkeypatch.setattr(pipeline.subprocess, "run", fake_run)
    assert main(["bench", "pipeline", "--families", "qwenimage", "--quick", "--repeats", "1"]) == 0
    expected = [n for n in pipeline.SETTINGS if n not in ("diffusers-excite", "nag[whole-block]")]
    assert started == [("qwenimage", [n], True) for n in expected]
    out, err = capsys.readouterr()
    assert "skipping diffusers-excite: it runs on sd15 only" in err
    assert ("skipping nag[whole-block]: it runs on sd3, flux, shapes-dit only, none of the chosen families "
            "qwenimage") in err
    assert "cfg+pag" in out and "diffusers-excite" not in out


def test_interleaved_plan_filters_each_family_too():
    jobs = dict(pipeline.plan(["sd15", "sd3"], ["cfg", "diffusers-excite"], interleave=True))
    assert jobs == {"sd15": ["cfg", "diffusers-excite"], "sd3": ["cfg"]}


def test_a_setting_no_chosen_family_can_take_is_an_error():
    with pytest.raises(AttnctlError, match=r"diffusers-excite runs on sd15 only, not on the chosen families sdxl, flux"):
        pipeline.plan(["sdxl", "flux"], ["diffusers-excite"], interleave=False)


def test_skipped_setting_smoke_run(capsys):
    """One process (sd15 at 32 px, 2 steps, 1 repeat); sdxl's is never started."""
    rows, _ = pipeline.run(repeats=1, families=["sd15", "sdxl"], quick=True, settings=["diffusers-excite"])
    assert [(r["family"], r["setting"]) for r in rows] == [("sd15", "diffusers-excite")]
    assert "skipping diffusers-excite on sdxl" in capsys.readouterr().err


def test_explicit_settings_skip_per_family_and_refuse_when_no_family_takes_one(capsys):
    assert dict(pipeline.plan(["flux2", "sd3"], ["cfg", "nag[whole-block]"], interleave=True)) == {
        "flux2": ["cfg"], "sd3": ["cfg", "nag[whole-block]"]}
    assert "skipping nag[whole-block] on flux2: it runs on" in capsys.readouterr().err
    with pytest.raises(AttnctlError, match=r"nag\[whole-block\] runs on sd3, flux, shapes-dit only, not on the "
                                           r"chosen families chroma, qwenimage"):
        pipeline.plan(["chroma", "qwenimage"], ["nag[whole-block]"], interleave=False)
