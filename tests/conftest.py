import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

from attnctl.testing import TINY_FAMILIES, tiny_call_kwargs, tiny_pipeline

# One CPU thread for the whole suite: float32 sums then split the same way on every machine, whatever its core
# count, and like those of the subprocesses the tests start with OMP_NUM_THREADS=1 (whose PNGs and scores are
# compared bit for bit). Tests that compare two computation paths at 1e-5 rely on it. (Until 2026-12-02 the
# suite got this by accident: a training test set one thread and never restored it.)
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The families every generic test runs on (prompt as first argument); FLUX.2 and Chroma have their own files (tests/test_family_*.py).
GENERIC_FAMILIES = tuple(f for f in TINY_FAMILIES if f in ("sd15", "sdxl", "sd3", "flux", "qwenimage"))


@pytest.fixture(params=GENERIC_FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def pipe(family):
    return tiny_pipeline(family)


@pytest.fixture
def call_kwargs(family):
    def make(**overrides):
        return tiny_call_kwargs(family, **overrides)

    return make

