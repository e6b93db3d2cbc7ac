"""The embedded ShapesWorld models load offline into stock pipelines and draw what they are asked."""

from pathlib import Path

import pytest

from attnctl.shapes.benchmark import prompt_set, score_pipeline

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@pytest.fixture(scope="module")
def shapes_pipe():
    folder = ASSETS / "shapes"
    if not (folder / "model_index.json").exists():
        pytest.skip(f"no embedded model at {folder}")
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shapes_asset_is_small_safetensors_with_a_card(shapes_pipe):
    folder = ASSETS / "shapes"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 40 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    card = (folder / "README.md").read_text()
    for needle in ("Data", "Architecture", "Training", "Benchmark", "parameters"):
        assert needle in card
    assert shapes_pipe.scheduler.config.prediction_type == "v_prediction"
    assert shapes_pipe.safety_checker is None and shapes_pipe.feature_extractor is None


def test_shapes_asset_draws_single_objects(shapes_pipe):
    # One pass over the 24 colour/shape prompts; the model card reports 200 images (68% at CFG 4.5).
    prompts = prompt_set("single", 24, seed=0)
    report, images = score_pipeline(shapes_pipe, prompts, seed=1000, steps=25, guidance_scale=4.5, batch_size=24)
    assert images.shape == (24, 64, 64, 3)
    assert report.all_present >= 0.5, report.per_image


def test_shapes_dit_asset_loads_offline_and_draws_single_objects():
    """The SD3-format model: small safetensors with a card, loads by name, draws most single objects right."""
    import attnctl

    folder = ASSETS / "shapes-dit"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 40 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    assert all(k in (folder / "README.md").read_text() for k in ("Architecture", "Training", "Benchmark"))
    pipe = attnctl.load("shapes-dit")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set("single", 12)
    report, _ = score_pipeline(pipe, prompts, seed=0, steps=12, guidance_scale=5.0, batch_size=12)
    assert report.all_present >= 0.5  # 0.81 at 25 steps on 96 images (model card); 12 steps here for speed
