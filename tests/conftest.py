import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

from attnctl.testing import TINY_FAMILIES, tiny_call_kwargs, tiny_pipeline


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=TINY_FAMILIES)
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


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test, restored after: float32 sums then split like those of a
    subprocess started with OMP_NUM_THREADS=1, so its outputs can be compared bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
