"""The reference's definition checked independently, the launcher's input errors, and lazy imports.

Nothing here launches a kernel except the adapter test (marked interpret), so these run in any process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attnctl.errors import AttnctlError, ControlError
from attnctl.kernels import is_available, perturbed_attention, perturbed_attention_ref
from attnctl.kernels.perturbed import run_request, supports_request


def qkv(B=2, H=2, Sq=24, Sk=24, D=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, s, D, generator=g, dtype=dtype) for s in (Sq, Sk, Sk)]


# --- the reference against independent formulations ------------------------------------------------------


def test_reference_u0_is_sdpa_and_full_u1_is_v():
    q, k, v = qkv()
    assert torch.allclose(perturbed_attention_ref(q, k, v), F.scaled_dot_product_attention(q, k, v))
    u = torch.tensor([[1.0, 0.0], [0.25, 1.0]])
    out = perturbed_attention_ref(q, k, v, u)
    assert torch.equal(out[0, 0], v[0, 0]) and torch.equal(out[1, 1], v[1, 1])
    plain = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out[1, 0], 0.75 * plain[1, 0] + 0.25 * v[1, 0])
    assert torch.allclose(out[0, 1], plain[0, 1])


@pytest.mark.parametrize("text_range", [(16, 24), (0, 5), (0, 0)])
def test_reference_image_identity_by_explicit_loop(text_range):
    """Each image query's perturbed output = softmax over [text keys + itself] @ V, written out per query."""
    q, k, v = qkv(B=1, H=1, seed=1)
    key_bias = torch.randn(1, 1, 24, dtype=torch.float64)
    u = torch.tensor([[0.4]], dtype=torch.float64)
    out = perturbed_attention_ref(q, k, v, u, mode="image", text_range=text_range, key_bias=key_bias)
    start, end = text_range
    text = list(range(start, end))
    scores = (q[0, 0] @ k[0, 0].T) / 4.0 + key_bias[0, 0]
    plain = torch.softmax(scores, -1) @ v[0, 0]
    for i in range(24):
        if start <= i < end:
            expected = plain[i]
        else:
            keys = text + [i]
            perturbed = torch.softmax(scores[i, keys], -1) @ v[0, 0, keys]
            expected = 0.6 * plain[i] + 0.4 * perturbed
        assert torch.allclose(out[0, 0, i], expected), i


def test_reference_regions_hide_keys_from_other_regions():
    q, k, v = qkv(B=1, H=1, seed=2)
    qr = torch.tensor([[0] * 12 + [1] * 12], dtype=torch.int32)
    kr = torch.tensor([[-1] * 4 + [0] * 10 + [1] * 10], dtype=torch.int32)
    out = perturbed_attention_ref(q, k, v, query_region=qr, key_region=kr)
    scores = (q[0, 0] @ k[0, 0].T) / 4.0
    for i in (0, 20):
        visible = [j for j in range(24) if kr[0, j] < 0 or kr[0, j] == qr[0, i]]
        expected = torch.softmax(scores[i, visible], -1) @ v[0, 0, visible]
        assert torch.allclose(out[0, 0, i], expected)


# --- launcher validation: clear ControlErrors, raised before anything is launched -------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q, k, v: dict(q=q.double(), k=k.double(), v=v.double()), "not supported"),
        (lambda q, k, v: dict(q=q, k=k.half(), v=v), "dtypes differ"),
        (lambda q, k, v: dict(q=q[..., :1, :], k=k, v=v, u=torch.ones(2, 2)), "Sq == Sk"),
        (lambda q, k, v: dict(q=q, k=k, v=v, mode="image", u=torch.ones(2, 2)), "text_range"),
        (lambda q, k, v: dict(q=q, k=k, v=v, mode="image", text_range=(5, 99)), "0 <= start <= end"),
        (lambda q, k, v: dict(q=q, k=k, v=v, mode="pag"), "mode must be one of"),
        (lambda q, k, v: dict(q=q, k=k, v=v, key_bias=torch.zeros(2, 2, 24, 24)), "dense"),
        (lambda q, k, v: dict(q=q, k=k, v=v, query_region=torch.zeros(2, 24, dtype=torch.int32)), "both"),
        (lambda q, k, v: dict(q=q, k=k, v=v, u=torch.ones(3, 2)), "u has shape"),
        (lambda q, k, v: dict(q=q.transpose(-1, -2), k=k.transpose(-1, -2), v=v.transpose(-1, -2)), "contiguous"),
        (lambda q, k, v: dict(q=torch.zeros(2, 2, 24, 300), k=torch.zeros(2, 2, 24, 300),
                              v=torch.zeros(2, 2, 24, 300)), "head_dim 300"),
        (lambda q, k, v: dict(q=q, k=k, v=v, out=torch.empty(2, 2, 24, 8)), "out must be"),
        (lambda q, k, v: dict(q=q[0], k=k, v=v), "4-D"),
    ],
)
def test_bad_inputs_raise_control_error(make, match):
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(ControlError, match=match):
        perturbed_attention(**make(q, k, v))


def test_cpu_without_interpreter_is_unavailable_with_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv(dtype=torch.float32)
    assert not is_available(q)
    with pytest.raises(AttnctlError, match="cannot run here"):
        perturbed_attention(q, k, v)


def test_importing_the_package_does_not_import_triton():
    code = "import sys, attnctl.kernels, attnctl.kernels.perturbed; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.strip() == "False"


# --- the engine adapter (attnctl.attention's "triton" backend) --------------------------------------------


def test_supports_request_rejects_dense_bias_and_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(dtype=torch.float32)
    dense = SimpleNamespace(q=q, k=k, v=v, bias=torch.zeros(1, 1, 24, 24), u=None, mode="full", text=None, scale=None)
    per_key = SimpleNamespace(q=q, k=k, v=v, bias=torch.zeros(1, 1, 1, 24), u=None, mode="full", text=None,
                              scale=None)
    if is_available(q):  # triton installed
        assert supports_request(per_key)
    assert not supports_request(dense)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not supports_request(per_key)


@pytest.mark.interpret
def test_run_request_matches_reference(interpreter):
    q, k, v = qkv(B=2, H=2, Sq=40, Sk=40, dtype=torch.float32, seed=3)
    bias = torch.randn(2, 1, 1, 40)
    bias_bool = torch.rand(1, 1, 1, 40) > 0.2
    u = torch.tensor([[0.0, 1.0], [0.5, 0.2]])
    req = SimpleNamespace(q=q, k=k, v=v, bias=bias, u=u, mode="image", text=slice(30, None), scale=None)
    ref = perturbed_attention_ref(q.double(), k.double(), v.double(), u, mode="image", text_range=(30, 40),
                                  key_bias=bias[:, :, 0, :].double())
    assert ((run_request(req).double() - ref).norm() / ref.norm()) < 1e-5
    req = SimpleNamespace(q=q, k=k, v=v, bias=bias_bool, u=u, mode="full", text=None, scale=0.3)
    key_bias = torch.zeros(1, 1, 40, dtype=torch.float64).masked_fill(~bias_bool[:, :, 0, :], float("-inf"))
    ref = perturbed_attention_ref(q.double(), k.double(), v.double(), u, key_bias=key_bias, scale=0.3)
    assert ((run_request(req).double() - ref).norm() / ref.norm()) < 1e-5
