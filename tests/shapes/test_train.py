"""Smoke tests of ShapesWorld training at tiny sizes (the real runs are marked slow)."""

import json

import pytest
import torch

from attnctl.errors import AttnctlError
from attnctl.shapes import train as T


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folders = {}
    for model in T.MODELS:
        out = tmp_path_factory.mktemp(model)
        folders[model] = T.train(model, out, config=T.tiny_config(model), device="cpu", progress=False)
    return folders


def test_shapes_folder_loads_into_the_stock_pipeline(trained):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained["shapes"])
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.steps_offset == 1
    assert pipe.safety_checker is None
    assert pipe.tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    out = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(out)).all()
    assert (trained["shapes"] / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_shapes_dit_folder_loads_into_the_stock_sd3_pipeline(trained):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(trained["shapes-dit"], text_encoder_3=None, tokenizer_3=None)
    assert pipe.vae.config.shift_factor is not None
    out = pipe("a blue star", num_inference_steps=2, height=32, width=32, output_type="np",
               max_sequence_length=8, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("model", T.MODELS)
def test_training_conditioning_equals_the_pipelines_encode_prompt(trained, model):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    prompts = ["a red circle and a blue square", ""]
    if model == "shapes":
        pipe = StableDiffusionPipeline.from_pretrained(trained[model])
        ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        ours, _ = T.encode_text(model, [pipe.text_encoder], T.tokenize(pipe.tokenizer, prompts))
        torch.testing.assert_close(ours, ref)
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(trained[model], text_encoder_3=None, tokenizer_3=None)
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                   do_classifier_free_guidance=False, max_sequence_length=8)
        ours, pooled = T.encode_text(model, [pipe.text_encoder, pipe.text_encoder_2],
                                     T.tokenize(pipe.tokenizer, prompts), t5_tokens=8)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(pooled, ref_pooled)


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    cfg = T.tiny_config("shapes", vae_steps=2, steps=4, checkpoint_every=2)
    T.train("shapes", tmp_path / "a", config=cfg, device="cpu", progress=False)

    real = T._lr_factor

    def interrupt(step, total, warmup):
        if total == cfg.steps and step == 2:
            raise KeyboardInterrupt  # as if the process were killed after the step-2 checkpoint
        return real(step, total, warmup)

    monkeypatch.setattr(T, "_lr_factor", interrupt)
    with pytest.raises(KeyboardInterrupt):
        T.train("shapes", tmp_path / "b", config=cfg, device="cpu", progress=False)
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(T, "_lr_factor", real)
    T.train("shapes", tmp_path / "b", config=cfg, device="cpu", progress=False)

    a = torch.load(tmp_path / "a" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for key in ("denoiser",):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value)
    for ea, eb in zip(a["ema"], b["ema"]):
        for name, value in ea.items():
            torch.testing.assert_close(eb[name], value)


def test_bad_names_and_options_raise_attnctl_errors(tmp_path):
    with pytest.raises(AttnctlError, match="shapes-dit"):
        T.default_config("shapes-dti")
    with pytest.raises(AttnctlError, match="unknown training option"):
        T.default_config("shapes", stepz=3)


@pytest.mark.slow
@pytest.mark.parametrize("model", T.MODELS)
def test_short_real_training_reduces_the_loss(tmp_path, model):
    """A few hundred steps of the real architecture at 64 px (minutes on 2 CPU cores)."""
    cfg = T.default_config(model, dataset_size=2000, vae_steps=200, steps=300, log_every=50, checkpoint_every=100)
    T.train(model, tmp_path, config=cfg, device="auto", progress=False)
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    vae_hist, hist = state["vae_history"], state["history"]
    assert vae_hist[-1][1] < 0.5 * vae_hist[0][1]
    assert hist[-1][1] < hist[0][1]


def test_collapsed_zero_tokens_equal_the_pipelines_full_sequence():
    """One zero token weighted log(256) in attention == the SD3 pipeline's 256 identical zero tokens."""
    torch.manual_seed(0)
    cfg = T.tiny_config("shapes-dit", dit_t5_tokens=256)
    transformer, encoders = T.build_denoiser(cfg, T.build_tokenizer())
    transformer.eval()
    ids = T.tokenize(T.build_tokenizer(), ["a red circle", "a small blue star on the left"])
    latents = torch.randn(2, 4, 8, 8)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        full, pooled = T.encode_text("shapes-dit", encoders, ids, t5_tokens=256)
        ref = transformer(latents, encoder_hidden_states=full, pooled_projections=pooled, timestep=t).sample
        n = T._collapse_pad(cfg, transformer)
        assert n == 1
        short, _ = T.encode_text("shapes-dit", encoders, ids, t5_tokens=n)
        ours = transformer(latents, encoder_hidden_states=short, pooled_projections=pooled, timestep=t).sample
        T._restore_processors(transformer)
        back = transformer(latents, encoder_hidden_states=full, pooled_projections=pooled, timestep=t).sample
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(back, ref)
    assert not torch.allclose(ref, transformer(latents, encoder_hidden_states=full[:, :80],
                                               pooled_projections=pooled, timestep=t).sample, atol=1e-4)


def test_decoder_finetune_keeps_the_encoder_and_is_exported(tmp_path):
    from diffusers import AutoencoderKL

    cfg = T.tiny_config("shapes", vae_steps=2, steps=2)
    folder = T.train("shapes", tmp_path, config=cfg, device="cpu", progress=False)
    before = AutoencoderKL.from_pretrained(folder / "vae").state_dict()
    T.finetune_decoder(tmp_path, steps=3, lr=1e-2, progress=False)
    after = AutoencoderKL.from_pretrained(T.export_pipeline(tmp_path, tmp_path / "p2") / "vae").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)


def test_train_verb_smoke_and_resume(tmp_path, capsys):
    """`attnctl train --tiny` trains, writes a loadable pipeline, and a second call resumes (no new steps)."""
    from attnctl.cli import main

    out = tmp_path / "run"
    assert main(["train", "shapes", "--out", str(out), "--tiny", "--quiet", "--device", "cpu",
                 "--set", "steps=2", "--set", "lr=3e-4"]) == 0
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["step"] == 2 and state["config"]["steps"] == 2
    assert state["config"]["lr"] == 3e-4  # "3e-4" is a string to YAML 1.1; the option still reads as a number
    assert "pipeline in" in capsys.readouterr().out
    import attnctl

    pipe = attnctl.load(str(out / "pipeline"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert main(["train", "shapes", "--out", str(out), "--tiny", "--quiet", "--device", "cpu",
                 "--set", "steps=2"]) == 0
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 2
    assert main(["train", "shapes", "--out", str(out), "--tiny", "--set", "stepz=2"]) == 2
    assert "unknown training option" in capsys.readouterr().err


def test_v2_scenes_hold_up_to_four_objects_and_bad_probabilities_are_named(tmp_path):
    from attnctl.shapes.data import parse_caption

    cfg = T.tiny_config("shapes", dataset_size=40, objects_p=(0, 0, 0, 1))
    images, captions = T.render_dataset(cfg, progress=False)
    assert images.shape[0] == 40 and max(len(parse_caption(c)) for c in captions) == 4
    assert any("," in c for c in captions) and any(c.count(" and ") >= 2 for c in captions)  # both grammars
    for bad in ((), (0.2,) * 5, (-1, 2)):
        with pytest.raises(AttnctlError, match="objects_p"):
            T.render_dataset(T.tiny_config("shapes", objects_p=bad), progress=False)


def test_unet_v2_has_cross_attention_at_every_level():
    cfg = T.tiny_config("shapes")
    unet, _ = T.build_denoiser(cfg, T.build_tokenizer())
    assert all(getattr(b, "has_cross_attention", False) for b in unet.down_blocks)
    assert all(getattr(b, "has_cross_attention", False) for b in unet.up_blocks)
    v1, _ = T.build_denoiser(T.tiny_config("shapes", unet_cross_all_levels=False), T.build_tokenizer())
    assert not getattr(v1.down_blocks[0], "has_cross_attention", False)


def test_latents_are_cached_beside_the_checkpoint_and_reused(tmp_path, monkeypatch):
    cfg = T.tiny_config("shapes", vae_steps=2, steps=2)
    T.train("shapes", tmp_path, config=cfg, device="cpu", progress=False)
    assert (tmp_path / "latents.pt").is_file()
    calls = []
    real = T.encode_dataset
    monkeypatch.setattr(T, "encode_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    T.train("shapes", tmp_path, config=T.tiny_config("shapes", vae_steps=2, steps=3), device="cpu", progress=False)
    assert calls == []  # resumed: the cached posterior was read, not recomputed


def test_init_from_starts_from_a_pipeline_and_refuses_another_architecture(tmp_path):
    cfg = T.tiny_config("shapes", vae_steps=2, steps=2)
    first = T.train("shapes", tmp_path / "a", config=cfg, device="cpu", progress=False)
    from diffusers import StableDiffusionPipeline

    shipped = StableDiffusionPipeline.from_pretrained(first)
    cont = T.tiny_config("shapes", vae_steps=2, steps=1, lr=0.0, warmup=1, ema=0.0, init_from=str(first))
    T.train("shapes", tmp_path / "b", config=cont, device="cpu", progress=False)
    state = torch.load(tmp_path / "b" / "state.pt", weights_only=False)
    for name, value in shipped.unet.state_dict().items():  # lr 0: the run kept the weights it started from
        torch.testing.assert_close(state["denoiser"][name], value)
    other = T.tiny_config("shapes", vae_steps=2, steps=1, unet_cross_all_levels=False, init_from=str(first))
    with pytest.raises(AttnctlError, match="init_from=.*do not fit"):
        T.train("shapes", tmp_path / "c", config=other, device="cpu", progress=False)


def test_init_from_continues_an_sd3_format_model_whose_t5_slot_is_absent(tmp_path):
    # shapes-dit folders save text_encoder_3 / tokenizer_3 as absent; loading them for init_from must not fail.
    cfg = T.tiny_config("shapes-dit", vae_steps=2, steps=2)
    first = T.train("shapes-dit", tmp_path / "a", config=cfg, device="cpu", progress=False)
    assert json.loads((first / "model_index.json").read_text())["text_encoder_3"][0] is None
    cont = T.tiny_config("shapes-dit", vae_steps=2, steps=1, lr=0.0, warmup=1, ema=0.0, init_from=str(first))
    T.train("shapes-dit", tmp_path / "b", config=cont, device="cpu", progress=False)
    from diffusers import SD3Transformer2DModel

    shipped = SD3Transformer2DModel.from_pretrained(first / "transformer")
    state = torch.load(tmp_path / "b" / "state.pt", weights_only=False)
    for name, value in shipped.state_dict().items():
        torch.testing.assert_close(state["denoiser"][name], value)


def test_a_checkpoint_write_that_fails_leaves_the_last_good_one(tmp_path, monkeypatch):
    cfg = T.tiny_config("shapes", vae_steps=2, steps=2, checkpoint_every=2)
    T.train("shapes", tmp_path, config=cfg, device="cpu", progress=False)
    good = (tmp_path / "state.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")  # some bytes got out before the disk filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        T.train("shapes", tmp_path, config=T.tiny_config("shapes", vae_steps=2, steps=4, checkpoint_every=2),
                device="cpu", progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "state.pt").read_bytes() == good
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.load(tmp_path / "state.pt", weights_only=False)["step"] == 2  # still loadable
