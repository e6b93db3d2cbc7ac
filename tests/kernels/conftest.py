"""Set-up for the kernel tests: run Triton kernels on the CPU through TRITON_INTERPRET.

triton decides between compiling and interpreting when a ``@triton.jit`` decorator runs, and its own helpers
(``tl.zeros``, ``tl.cdiv``, ...) are decorated when triton is first imported. So the interpreter works in
this process only if triton was first imported with TRITON_INTERPRET=1. This conftest does that import
itself when nothing imported triton yet (and no GPU is present), then removes the variable again so only
the tests here see it (the ``interpreter`` fixture sets it per test). When some earlier test module already
imported triton (importing diffusers does), ``test_perturbed.py`` runs itself in a fresh process instead.
"""

from __future__ import annotations

import os
import sys

import pytest


def _import_triton_interpreted() -> None:
    if "triton" in sys.modules or "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        return  # a GPU session: keep triton compiling; the interpreter tests go to a subprocess
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401  (its @jit helpers are now interpreter functions)
    except ImportError:
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


_import_triton_interpreted()


def interpreter_in_process() -> bool:
    """True when triton was imported in interpreter mode, so kernels can run on CPU tensors here."""
    try:
        import triton.language.standard as standard
    except ImportError:
        return False
    return type(standard.zeros).__name__ == "InterpretedFunction"


@pytest.fixture
def interpreter(monkeypatch):
    """Run the test's kernels under the Triton interpreter, in this process (skip if impossible here)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed (pip install attnctl[dev])")
    if not interpreter_in_process():
        pytest.skip("triton was imported before TRITON_INTERPRET could be set; "
                    "test_interpreter_suite_in_fresh_process runs these tests instead")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
