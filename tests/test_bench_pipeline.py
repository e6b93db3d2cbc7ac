"""``attnctl bench pipeline``'s defaults: every (family, setting) it plans can run. Nothing here times anything:
the plan is checked without running it, and one smoke run at the quick size (32 px, 2 steps, 1 repeat)
checks that a setting a family cannot take is skipped with a note."""

import pytest

from attnctl.bench import pipeline
from attnctl.bench.overhead import FAMILIES
from attnctl.errors import AttnctlError


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
    err = capsys.readouterr().err
    for family in FAMILIES:
        if family != "sd15":
            assert f"skipping diffusers-excite on {family}: it runs on sd15 only" in err


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
