"""Recipe validation refuses a control (or an edit's inversion) the model's family cannot take, before any weights
load, when the family is known from the model string: ``tiny:*``, the embedded models, a local folder's
``model_index.json``. A hub id's family is not known before loading: ``attnctl.apply`` says then."""

import json

import pytest

from attnctl import models
from attnctl.cli import main
from attnctl.controls.nag import Nag
from attnctl.errors import RecipeError
from attnctl.recipe import json_schema, load_recipe

BASE = "prompt: a red circle\nsteps: 2\nheight: 32\nwidth: 32\n"


def _write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Validation must not load a pipeline: any load fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded during validation")

    monkeypatch.setattr(models, "load", refuse)


def _folder(tmp_path, denoiser: tuple[str, str], **components):
    folder = tmp_path / "model"
    folder.mkdir()
    index = {"_class_name": "SomePipeline", denoiser[0]: ["diffusers", denoiser[1]], **components}
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


@pytest.mark.parametrize("model, family", [
    ("tiny:sd15", "sd15"), ("tiny:flux2", "flux2"), ("tiny:flux2-dev", "flux2"), ("tiny:chroma", "chroma"),
    ("tiny:qwenimage", "qwenimage"),
    ("shapes", "sd15"), ("shapes-dit", "sd3"), ("tiny:nope", None), ("black-forest-labs/FLUX.2-klein", None),
])
def test_model_family_from_the_model_string(model, family):
    assert models.model_family(model) == family


def test_model_family_from_a_folders_model_index(tmp_path):
    assert models.model_family(_folder(tmp_path, ("transformer", "Flux2Transformer2DModel"))) == "flux2"
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"]}))
    assert models.model_family(str(sdxl)) == "sdxl"
    (sdxl / "model_index.json").write_text("{not json")
    assert models.model_family(str(sdxl)) is None


def _nag_without(monkeypatch, family):
    """``nag`` declared without ``family`` for one test (it runs on every family now), with a reason: the
    validation of a control a family cannot take, whichever control that is."""
    monkeypatch.setattr(Nag, "families", tuple(f for f in Nag.families if f != family))
    monkeypatch.setattr(Nag, "family_notes", {family: "a reason this test gives"})


@pytest.mark.parametrize("model", ["tiny:flux2", "tiny:chroma", "tiny:qwenimage", "tiny:zimage"])
def test_a_control_the_family_cannot_take_fails_at_validation(tmp_path, model, no_loading, monkeypatch):
    family = model.split(":")[1]
    _nag_without(monkeypatch, family)
    path = _write(tmp_path, f"model: {model}\n{BASE}controls:\n  maps: {{words: [circle]}}\n"
                            "  nag: {negative_prompt: blue}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}:8: controls.nag: control 'nag' does not support the {family} family of "
                              f"model {model!r} (it supports {', '.join(Nag.families)})")
    assert Nag.family_notes[family] in message


def test_a_local_folders_family_and_a_list_entry(tmp_path, no_loading, monkeypatch):
    _nag_without(monkeypatch, "qwenimage")
    folder = _folder(tmp_path, ("transformer", "QwenImageTransformer2DModel"))
    path = _write(tmp_path, f"model: {folder}\n{BASE}controls:\n  nag:\n    - {{negative_prompt: blue}}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:8: controls\.nag\.0: control 'nag' does not support the "
                                          r"qwenimage family"):
        load_recipe(path)


def test_a_swept_model_is_checked_at_every_setting(tmp_path, no_loading, monkeypatch):
    _nag_without(monkeypatch, "chroma")
    path = _write(tmp_path, f"model: [tiny:sd15, tiny:chroma]\nsweep: [model]\n{BASE}"
                            "controls:\n  nag: {negative_prompt: blue}\n")
    with pytest.raises(RecipeError, match=r"sweep setting \(model='tiny:chroma'\) is invalid: .*controls\.nag: "
                                          r"control 'nag' does not support the chroma family"):
        load_recipe(path)


def test_inverting_an_image_on_a_family_without_inversion_fails_at_validation(tmp_path, capsys, no_loading,
                                                                               monkeypatch):
    """Every family inverts today; a family whose adapter declares ``inversion_unsupported`` is refused with that
    reason before any weights load (the declaration is set here to check the mechanism)."""
    from attnctl.adapters import ADAPTERS

    model, family, why = "tiny:qwenimage", "qwenimage", "a reason the adapter gives"
    monkeypatch.setattr(ADAPTERS[family], "inversion_unsupported", why)
    path = _write(tmp_path, f"model: {model}\n{BASE}controls:\n  edit: {{target: a blue circle, image: in.png}}\n")
    with pytest.raises(RecipeError, match=rf"controls\.edit\.image = 'in.png': inverting a real image does not "
                                          rf"support the {family} family of model '{model}': .*{why}"):
        load_recipe(path)
    assert main(["run", str(path), "--dry-run"]) == 2  # the command line says it too, nothing generated
    assert "controls.edit.image = 'in.png'" in capsys.readouterr().err


@pytest.mark.parametrize("text", [
    "model: tiny:chroma\n" + BASE + "controls:\n  edit: {target: a blue circle, image: in.png}\n",  # Chroma inverts
    *("model: tiny:%s\n" % family + BASE + "controls:\n  edit: {target: a blue circle, image: in.png}\n"
      for family in ("flux2", "qwenimage", "zimage")),  # so do FLUX.2, Qwen-Image and Z-Image
    "model: tiny:qwenimage\n" + BASE + "controls:\n  edit: {target: a blue circle}\n",  # no image: no inversion
    "model: shapes\n" + BASE + "controls:\n  nag: {negative_prompt: blue}\n",
    # nag runs on every family: FLUX.2, Chroma, Qwen-Image and Z-Image too
    *(f"model: tiny:{family}\n" + BASE + "controls:\n  nag: {negative_prompt: blue}\n"
      for family in ("flux2", "chroma", "qwenimage", "zimage")),
    # a hub id: the family is known only once loaded
    "model: some-org/some-model\n" + BASE + "controls:\n  nag: {negative_prompt: blue}\n",
])
def test_what_each_family_can_take_validates(tmp_path, text, no_loading):
    load_recipe(_write(tmp_path, text))


def test_schema_lists_each_controls_families():
    defs = json_schema()["$defs"]
    assert defs["control_nag"]["x-attnctl-families"] == list(Nag.families)
    assert "Families: sd15, sdxl, sd3, flux, flux2, chroma, qwenimage, zimage." in defs["control_nag"]["description"]
    assert "qwenimage" in defs["control_perturb"]["x-attnctl-families"]
