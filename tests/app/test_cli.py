"""`attnctl app`, the launcher `app/app.py`, and the rule that `import attnctl` never imports gradio."""

import runpy
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_attnctl_and_app_help_do_not_import_gradio():
    code = ("import sys, attnctl, attnctl.recipe, attnctl.run, attnctl.app, attnctl.app.forms; "
            "from attnctl.cli import main\n"
            "try:\n    main(['app', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'gradio' not in sys.modules, 'gradio was imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "--host" in out.stdout and "--port" in out.stdout and "--model" in out.stdout


def test_launcher_builds_the_app_for_a_space(monkeypatch):
    import gradio as gr

    monkeypatch.setenv("ATTNCTL_MODEL", "tiny:sd15")
    namespace = runpy.run_path(str(REPO / "app" / "app.py"), run_name="space")  # a Space imports, then launches
    demo = namespace["demo"]
    assert isinstance(demo, gr.Blocks)
    model = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "model")
    assert model.value == "tiny:sd15"
