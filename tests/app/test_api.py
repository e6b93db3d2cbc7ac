"""Every endpoint of the app through ``gradio_client``, on the embedded ``shapes`` model (64 px, 4 steps)."""

import numpy as np
import pytest
import yaml
from PIL import Image

from attnctl.recipe import load_recipe

FAST = dict(steps=4, seeds="1")  # 64 px model, 4 steps: a fraction of a second per image

AppError = pytest.importorskip("gradio_client.exceptions").AppError


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_returns_images_maps_and_the_recipe(client):
    images, maps, animation, summary, recipe_file, recipe_text = client.predict(
        prompt="a red circle", maps__enabled=True, maps__words="red circle, circle", api_name="/generate", **FAST)
    assert [item["caption"] for item in images] == ["a red circle (seed 1)"]
    assert pixels(images[0]["image"]).shape == (64, 64, 3)
    assert sorted(item["caption"].split(":")[0] for item in maps) == ["circle", "red circle"]
    overlay = pixels(maps[0]["image"])
    assert overlay.shape == (64, 64, 3) and not np.array_equal(overlay, pixels(images[0]["image"]))
    assert "1 image on `shapes`" in summary and "maps" in summary
    recipe = load_recipe(recipe_file)  # the downloadable recipe re-runs with `attnctl run`
    assert recipe.steps == 4 and recipe.seeds == 1 and recipe.controls == {"maps": {"words": ["red circle", "circle"]}}
    assert yaml.safe_load(recipe_text) == yaml.safe_load(open(recipe_file).read())


def test_same_request_gives_the_same_image_and_yaml_runs_match_the_form(client):
    first = client.predict(prompt="a blue square", toy_dim__enabled=True, toy_dim__strength=2.0,
                           api_name="/generate", **FAST)
    again = client.predict(prompt="a blue square", toy_dim__enabled=True, toy_dim__strength=2.0,
                           api_name="/generate", **FAST)
    plain = client.predict(prompt="a blue square", api_name="/generate", **FAST)
    from_yaml = client.predict(text=first[5], api_name="/run_yaml")
    image = pixels(first[0][0]["image"])
    assert np.array_equal(image, pixels(again[0][0]["image"]))
    assert np.array_equal(image, pixels(from_yaml[0][0]["image"]))
    assert not np.array_equal(image, pixels(plain[0][0]["image"]))  # the control reached the pipeline
    assert yaml.safe_load(first[5])["controls"] == {"toy_dim": {"strength": 2.0}}


def test_a_maps_word_missing_from_the_prompt_is_a_readable_error_and_the_app_keeps_working(client):
    with pytest.raises(AppError, match=r"'dog' is not in the prompt 'a red circle'\. The prompt tokenizes as"):
        client.predict(prompt="a red circle", maps__enabled=True, maps__words="dog", api_name="/generate", **FAST)
    with pytest.raises(AppError, match=r"steps = 0: Input should be greater than or equal to 1"):
        client.predict(text="prompt: a red circle\nsteps: 0\n", api_name="/run_yaml")
    with pytest.raises(AppError, match=r"seeds = 'one'"):
        client.predict(prompt="a red circle", seeds="one", api_name="/generate")
    with pytest.raises(AppError, match=r"unknown key 'stepz' \(did you mean 'steps'"):
        client.predict(text="prompt: a red circle\nstepz: 4\n", api_name="/run_yaml")
    with pytest.raises(AppError, match=r"cannot load model 'no/such-model'"):
        client.predict(prompt="a red circle", model="no/such-model", api_name="/generate", **FAST)
    images = client.predict(prompt="a red circle", api_name="/generate", **FAST)[0]
    assert len(images) == 1


def test_a_subject_word_missing_from_the_prompt_is_a_readable_error(client):
    from attnctl.app.forms import fields_of
    from attnctl.controls import CONTROLS, control_class

    if "excite" not in CONTROLS:
        pytest.skip("the excite control is not registered in this version")
    words = next(f for f in fields_of(control_class("excite").Options) if f.key == "subjects")
    value = "[dog]" if words.kind == "yaml" else "dog"  # subjects: a list of words, or "auto"
    with pytest.raises(AppError, match=r"'dog'.*not in the prompt"):
        client.predict(prompt="a red circle", excite__enabled=True, **{f"excite__{words.key}": value},
                       api_name="/generate", **FAST)


def test_download_and_load_recipe_round_trip(client, tmp_path):
    from gradio_client import handle_file

    recipe_file, text = client.predict(prompt="a red circle\na green star", seeds="3, 4", steps=6,
                                       negative_prompt="blurry", maps__enabled=True, maps__words="circle",
                                       maps__window__stop=0.5, api_name="/recipe")
    data = yaml.safe_load(text)
    assert data == {"model": "shapes", "prompt": ["a red circle", "a green star"], "seeds": [3, 4], "steps": 6,
                    "guidance_scale": 5.0, "negative_prompt": "blurry",
                    "controls": {"maps": {"words": ["circle"], "window": {"stop": 0.5}}}}
    values = client.predict(file=handle_file(recipe_file), api_name="/load_recipe")
    names = [p["parameter_name"] for p in client.view_api(return_format="dict", print_info=False)
             ["named_endpoints"]["/generate"]["parameters"]]
    form = dict(zip(names, values))
    assert form["prompt"] == "a red circle\na green star" and form["seeds"] == "3, 4" and form["steps"] == 6
    assert form["maps__enabled"] is True and form["maps__words"] == "circle" and form["maps__window__stop"] == 0.5
    assert form["toy_dim__enabled"] is False
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompt: a red circle\ncontrols:\n  maps:\n    wordz: [circle]\n")
    with pytest.raises(AppError, match=r"(?s)bad\.yaml.*unknown key 'wordz' \(did you mean 'words'\?\)"):
        client.predict(file=handle_file(str(bad)), api_name="/load_recipe")


def test_layers_lists_kinds_groups_layers_and_heads(client):
    updates = client.predict(model="shapes", api_name="/layers")  # one update per layer field of the controls
    updates = [updates] if isinstance(updates, dict) else list(updates)
    assert all(u["choices"] == updates[0]["choices"] for u in updates)
    values = [choice[1] for choice in updates[0]["choices"]]
    assert values[:2] == ["kind=self", "kind=cross"]
    assert {"down_blocks", "mid_block", "up_blocks"} <= set(values)
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in values
    assert "mid_block.attentions.0.transformer_blocks.0.attn2:heads=3" in values
    # A layer chosen from the list is a valid selector for the maps control.
    images, maps, *_ = client.predict(prompt="a red circle", maps__enabled=True, maps__words="circle",
                                      maps__layers=["mid_block.attentions.0.transformer_blocks.0.attn2:heads=3"],
                                      api_name="/generate", **FAST)
    assert len(maps) == 1


def test_edit_tab_returns_target_source_and_mask_side_by_side(client, tmp_path):
    images, _, _, summary, recipe_file, _ = client.predict(
        prompt="a red circle", edit__enabled=True, edit__target="a blue circle",
        edit__blend__words="red, blue", api_name="/generate", **FAST)
    assert [item["caption"] for item in images] == [
        "a red circle (seed 1)", "source: a red circle (seed 1)", "mask: a red circle (seed 1)"]
    target, source = pixels(images[0]["image"]), pixels(images[1]["image"])
    assert target.shape == source.shape == (64, 64, 3) and not np.array_equal(target, source)
    assert "1 image on `shapes`" in summary and "edit" in summary
    assert load_recipe(recipe_file).controls["edit"]["target"] == "a blue circle"
    # A real image (a file on the server; in the page, the upload fills this path): inverted under the source
    # prompt, then edited; the recipe names the file.
    real = tmp_path / "real.png"
    Image.fromarray(source).save(real)
    images, *_, recipe_text = client.predict(
        prompt="a red circle", edit__enabled=True, edit__target="a blue circle", edit__image=str(real),
        api_name="/generate", **FAST)
    assert [item["caption"].split(":")[0] for item in images] == ["a red circle (seed 1)", "source"]
    assert yaml.safe_load(recipe_text)["controls"]["edit"]["image"] == str(real)


def test_compare_puts_the_baseline_sheet_first_and_needs_a_control(client):
    images, *_ = client.predict(prompt="a red circle", toy_dim__enabled=True, toy_dim__strength=2.0, compare=True,
                                api_name="/generate", **FAST)
    assert images[0]["caption"].startswith("baseline (no control) | controlled")
    assert [item["caption"] for item in images[1:]] == ["a red circle (seed 1)"]
    sheet = pixels(images[0]["image"])
    assert sheet.shape[0] >= 128 and sheet.shape[1] > 2 * 128  # baseline | controlled | diagnostics
    plain = pixels(client.predict(prompt="a red circle", api_name="/generate", **FAST)[0][0]["image"])
    baseline_cell = np.asarray(Image.fromarray(plain).resize((128, 128), Image.NEAREST))
    top = 30  # the sheet's title and column labels
    assert np.array_equal(sheet[top:top + 128, :128], baseline_cell)  # the baseline is the plain image
    with pytest.raises(AppError, match="controls: is empty"):
        client.predict(prompt="a red circle", compare=True, api_name="/generate", **FAST)
