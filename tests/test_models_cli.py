import json
import subprocess
import sys

import pytest

import attnctl
from attnctl.cli import main
from attnctl.errors import ModelError


def test_load_tiny_and_folder_round_trip(tmp_path):
    pipe = attnctl.load("tiny:sd3")
    pipe.save_pretrained(tmp_path / "sd3")
    again = attnctl.load(str(tmp_path / "sd3"))
    assert type(again).__name__ == "StableDiffusion3Pipeline"
    assert attnctl.models.family_of(again) == "sd3"


def test_model_errors():
    with pytest.raises(ModelError, match="allowed: tiny:sd15"):
        attnctl.load("tiny:sd99")
    with pytest.raises(ModelError, match="cannot load model 'nobody/no-such-model'"):
        attnctl.load("nobody/no-such-model")


def test_unsupported_pipeline_names_supported_families():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    pipe = DDPMPipeline(UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                    down_block_types=("DownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "UpBlock2D")), DDPMScheduler())
    with pytest.raises(ModelError, match=r"DDPMPipeline is not a supported pipeline.*FLUX"):
        attnctl.apply(pipe).__enter__()


def test_cli_help_and_layers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "layers" in capsys.readouterr().out
    assert main(["layers", "tiny:flux", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"joint", "single"}
    assert all(r["queries"] and r["grid"] for r in rows)


def test_tiny_flux2_dev_layers_and_folder_round_trip(tmp_path, capsys):
    """``tiny:flux2-dev`` (Flux2Pipeline, a Mistral3 text encoder): ``attnctl layers`` lists its FLUX.2 sites with
    the 64-token text span it asks tiny models for, and the pipeline saves and loads back as a flux2 folder."""
    assert main(["layers", "tiny:flux2-dev", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["layer"], r["kind"], r["grid"]) for r in rows] == [
        ("transformer_blocks.0.attn", "joint", [8, 8]), ("single_transformer_blocks.0.attn", "single", [8, 8]),
        ("single_transformer_blocks.1.attn", "single", [8, 8])]
    assert all(r["text"] == 64 for r in rows)
    pipe = attnctl.load("tiny:flux2-dev")
    pipe.save_pretrained(tmp_path / "dev")
    again = attnctl.load(str(tmp_path / "dev"))
    assert type(again).__name__ == "Flux2Pipeline" and attnctl.models.family_of(again) == "flux2"
    assert attnctl.models.model_family(str(tmp_path / "dev")) == "flux2"
    assert again.tokenizer.chat_template == pipe.tokenizer.chat_template


def test_cli_errors_are_short(capsys):
    assert main(["layers", "tiny:nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown tiny model 'tiny:nope'" in err and "Traceback" not in err


def test_bench_overhead_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    assert main(["bench", "overhead", "--quick", "--repeats", "1", "--families", "sd15,shapes",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["family"] for r in rows] == ["sd15", "shapes"]
    assert {"family", "stock_s", "attnctl_s", "overhead"} <= set(rows[0])
    assert rows[1]["size"] == "64x64" and rows[1]["calls_per_step"] > 0  # the embedded model, as users run it


def test_bench_overhead_runs_on_the_newer_families(tmp_path):
    """FLUX.2 [klein]'s first argument is `image`: the benchmark passes the prompt by keyword on every family."""
    out = tmp_path / "overhead.json"
    families = ["flux2", "chroma", "qwenimage", "zimage"]
    assert main(["bench", "overhead", "--quick", "--repeats", "1", "--families", ",".join(families),
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["family"] for r in rows] == families and all(r["calls_per_step"] > 0 for r in rows)


def test_bench_unknown_family_is_a_clear_error(capsys):
    assert main(["bench", "overhead", "--families", "shape"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark family 'shape' (did you mean 'shapes'" in err and "allowed: sd15" in err


def test_bench_pipeline_smoke(tmp_path):
    out = tmp_path / "pipeline.json"
    assert main(["bench", "pipeline", "--quick", "--repeats", "1", "--families", "sd15",
                 "--settings", "baseline,cfg,cfg+pag,cfg+pag[all-blocks]", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["family"], r["setting"]) for r in rows] == [("sd15", s) for s in
                                                           ("baseline", "cfg", "cfg+pag", "cfg+pag[all-blocks]")]
    assert all(r["seconds_per_image"] > 0 and r["peak_mem_mb"] > 50 for r in rows)
    assert main(["bench", "pipeline", "--settings", "cfg+nope"]) == 2
    # Interleaved: one process for the family, every setting timed once per round.
    assert main(["bench", "pipeline", "--quick", "--repeats", "2", "--families", "sd15", "--interleave",
                 "--settings", "cfg,cfg+pag[0-0.2]", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["setting"] for r in rows] == ["cfg", "cfg+pag[0-0.2]"] and rows[1]["vs_cfg"] > 0
    assert all(r["runs"] == 2 and r["peak_shared"] and r["min_s"] <= r["seconds_per_image"] for r in rows)
    assert main(["bench", "overhead", "--interleave"]) == 2


def test_import_attnctl_does_not_import_gradio_or_triton():
    code = "import sys, attnctl; print('gradio' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False"
