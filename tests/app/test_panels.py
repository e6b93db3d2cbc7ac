"""Panels that activate when their library part exists: regions (boxes) and head search, with stand-ins."""


import pytest
import yaml
from pydantic import BaseModel, Field

from attnctl.controls import CONTROLS, Control
from attnctl.controls.base import StrictOptions


class Region(BaseModel):
    phrase: str
    box: list[float] = Field(min_length=4, max_length=4)


class StandInRegionsOptions(StrictOptions):
    regions: list[Region] = Field(min_length=1)
    strength: float = Field(1.0, ge=0.0, le=5.0)


class StandInRegions(Control):
    """Stands in for the regions control (options only; it changes nothing)."""

    name = "regions"
    Options = StandInRegionsOptions


@pytest.fixture(scope="module")
def client(pipelines, tmp_path_factory):
    from gradio_client import Client

    from attnctl.app import build_app
    from attnctl.app.jobs import RunFolders

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(CONTROLS, "regions", StandInRegions)
        demo = build_app("shapes", cache=pipelines, folders=RunFolders(tmp_path_factory.mktemp("runs")))
        _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
        try:
            yield Client(url, verbose=False)
        finally:
            demo.close()


def test_regions_typed_as_lines_become_the_controls_region_list_and_load_back(client):
    from gradio_client import handle_file

    recipe_file, text = client.predict(prompt="a red circle", regions__enabled=True, regions__strength=2.0,
                                       regions__boxes="red circle: 0, 0, 0.5, 0.5", api_name="/recipe")
    assert yaml.safe_load(text)["controls"] == {
        "regions": {"strength": 2.0, "regions": [{"phrase": "red circle", "box": [0.0, 0.0, 0.5, 0.5]}]}}
    images, _, _, summary, *_ = client.predict(prompt="a red circle", steps=2, regions__enabled=True,
                                               regions__boxes="red circle: 0, 0, 0.5, 0.5", api_name="/generate")
    assert len(images) == 1 and "regions" in summary
    with pytest.raises(Exception, match=r"regions line 1 'circle: 0, 0': write `phrase: x0, y0, x1, y1`"):
        client.predict(prompt="a red circle", regions__enabled=True, regions__boxes="circle: 0, 0", api_name="/recipe")
    with pytest.raises(Exception, match=r"controls\.regions: regions = \[\]"):
        client.predict(prompt="a red circle", regions__enabled=True, api_name="/recipe")
    values = client.predict(file=handle_file(recipe_file), api_name="/load_recipe")
    assert "red circle: 0, 0, 0.5, 0.5" in values and 2.0 in values


def test_head_search_runs_the_library_hunt_on_the_forms_recipe(client, pipelines):
    """The tab runs the real search on the form's recipe (its perturbation layers are the candidates) and shows
    the chosen heads as a runnable recipe snippet; the cached pipeline keeps its scheduler."""
    from attnctl.recipe import load_recipe

    found = client.predict(1, 1, "", prompt="a red circle", steps=2, scheduler="EulerDiscreteScheduler",
                           perturb__enabled=True, perturb__scale=2.0, perturb__layers=["mid_block"],
                           api_name="/hunt")
    assert "# baseline (no perturbation):" in found and "# round 1: mid_block." in found
    snippet = yaml.safe_load(found)
    (layer,) = snippet["controls"]["perturb"]["layers"]
    assert layer.startswith("mid_block.") and layer.endswith((":heads=0", ":heads=1", ":heads=2", ":heads=3"))
    assert load_recipe({"model": "shapes", "prompt": "a red circle", **snippet}).controls["perturb"]["scale"] == 2.0
    with pipelines.use("shapes") as pipe:  # the search's scheduler was the recipe's, not the cache's for good
        assert type(pipe.scheduler).__name__ != "EulerDiscreteScheduler"
    with pytest.raises(Exception, match=r"needs a recipe with one `controls: perturb:` block"):
        client.predict(1, 1, "", prompt="a red circle", steps=2, api_name="/hunt")
    # A form field never names a callable of the server's Python (the CLI allows module:Factory objectives).
    with pytest.raises(Exception, match=r"unknown objective 'os'; allowed: shapes, shapes-graded, clip, pickscore$"):
        client.predict(1, 1, "os:system:touch hacked", prompt="a red circle", steps=2, perturb__enabled=True,
                       perturb__layers=["mid_block"], api_name="/hunt")
