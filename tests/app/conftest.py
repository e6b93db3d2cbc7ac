"""One app served on loopback for the module's tests, on the embedded ``shapes`` model at 64 px and 4 steps.

A toy control (``toy_dim``) is registered before the app is built: it appears in the page without any app
change (its panel is generated from its options schema), and it changes images, so tests can tell whether one
request's controls leak into another's.
"""

import pytest
import torch
from pydantic import Field

from attnctl.controls import CONTROLS, Control
from attnctl.controls.base import StrictOptions

gradio = pytest.importorskip("gradio")



class ToyDimOptions(StrictOptions):
    strength: float = Field(0.0, ge=0.0, le=10.0, description="How much to hide every text token but the first.")


class ToyDim(Control):
    """Test control: a bias of -strength on the text tokens after the first, in every layer with text."""

    name = "toy_dim"
    Options = ToyDimOptions

    def bind(self, session):
        return {s.name: None for s in session.sites if s.has_text}

    def on_attention(self, call):
        bias = torch.zeros(call.k.shape[2], dtype=call.q.dtype)
        bias[call.text.start + 1 : call.text.stop] = -self.options.strength
        call.add_bias(bias)


@pytest.fixture(scope="session")
def pipelines():
    """Loaded pipelines, shared by the test modules' apps (the cache holds no request state)."""
    from attnctl.app.pipelines import PipelineCache

    return PipelineCache()


@pytest.fixture(scope="module")
def served(tmp_path_factory, pipelines):
    from attnctl.app import build_app
    from attnctl.app.jobs import RunFolders

    CONTROLS["toy_dim"] = ToyDim
    demo = build_app("shapes", cache=pipelines, folders=RunFolders(tmp_path_factory.mktemp("runs")), concurrency=2)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()
        CONTROLS.pop("toy_dim", None)


@pytest.fixture
def client(served):
    from gradio_client import Client

    return Client(served, verbose=False)
