"""The built wheel, installed non-editable in a fresh virtual environment, works on its own."""

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("attnctl-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    # Dependencies come from this environment's site-packages (a plain path: its editable finder stays off).
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def run(*args, cwd=tmp_path):
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True).stdout

    located = run(str(python), "-c", "import attnctl; print(attnctl.__file__)")
    assert str(venv) in located  # the installed wheel, not the repository
    assert "run" in run(str(venv / "bin" / "attnctl"), "--help")
    assert "--port" in run(str(venv / "bin" / "attnctl"), "app", "--help")
    assert "single_transformer_blocks.0.attn" in run(str(venv / "bin" / "attnctl"), "layers", "tiny:flux")
    # The embedded model ships inside the wheel (setup.py copies assets/ to attnctl/assets) and loads offline.
    loaded = run(str(python), "-c", "import attnctl; from attnctl.models import assets_dir; "
                 "p = attnctl.load('shapes'); print(type(p).__name__, assets_dir())")
    assert loaded.split()[0] == "StableDiffusionPipeline" and str(venv) in loaded.split()[1]
    # No top-level `kernels`/`app` package shadows Hugging Face's from the repository root.
    run(str(python), "-c", "import diffusers, attnctl.kernels; import importlib.util as u; "
        "assert u.find_spec('app') is None or 'attnctl' not in str(u.find_spec('app').origin)", cwd=REPO)
    assert not (REPO / "kernels" / "__init__.py").exists() and not (REPO / "app" / "__init__.py").exists()
