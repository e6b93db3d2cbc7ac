"""Ship the repository's top-level ``assets/`` (the embedded ShapesWorld models) inside the wheel as
``attnctl/assets``, so ``attnctl.load("shapes")`` works after a plain, non-editable ``pip install``.

Everything else is configured in pyproject.toml; an editable install reads ``assets/`` in place.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ASSETS = Path(__file__).resolve().parent / "assets"


class BuildPyWithAssets(build_py):
    def run(self):
        super().run()
        if not ASSETS.is_dir():
            return
        target = Path(self.build_lib) / "attnctl" / "assets"
        for src in sorted(ASSETS.rglob("*")):
            if src.is_file() and "__pycache__" not in src.parts:
                dest = target / src.relative_to(ASSETS)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)


setup(cmdclass={"build_py": BuildPyWithAssets})
