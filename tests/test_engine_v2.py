"""Engine v2: controls act inside each module's own processor, at its attention call (attnctl.intercept).

Real components only: diffusers' IP-Adapter processor and image projection with random weights, diffusers'
attention backends, a user's processor subclass, a processor that computes attention by hand.
"""

import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

import attnctl
from attnctl.controls.base import Control
from attnctl.controls.maps import Maps
from attnctl.controls.perturb import Perturb
from attnctl.controls.regions import Regions
from attnctl.engine import apply
from attnctl.errors import ProcessorError
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

PROMPT = "a red circle"
SD15_SITE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
SD15_CROSS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


class HookAll(Control):
    """Hooks every site (or those named) and changes nothing: forces the controlled attention path."""

    name = "hook-all"

    def __init__(self, sites=None):
        super().__init__()
        self.only = sites

    def bind(self, session):
        return {s.name: None for s in session.sites if self.only is None or s.name in self.only}

    def on_attention(self, call):
        call.then(lambda out: out)


# -- (1) IP-Adapter ------------------------------------------------------------------------------------------
def ip_adapter_pipeline(image_embed_dim: int = 16, tokens: int = 4):
    """tiny SD1.5 with diffusers' IP-Adapter processors on every attn2 and an image projection, random weights."""
    pipe = tiny_pipeline("sd15")
    unet = pipe.unet
    gen = torch.Generator().manual_seed(0)
    dim = unet.config.cross_attention_dim
    projection = ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=dim,
                                 num_image_text_embeds=tokens)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"  # what diffusers' IP-Adapter loader sets
    processors = {}
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
            processor = IPAdapterAttnProcessor2_0(hidden, dim, num_tokens=(tokens,), scale=1.0)
            for layer in list(processor.to_k_ip) + list(processor.to_v_ip):
                layer.weight.data = torch.randn(layer.weight.shape, generator=gen) * 0.5
        processors[name] = processor
    unet.set_attn_processor(processors)
    embeds = [torch.randn(2, 1, image_embed_dim, generator=gen)]  # [negative; positive] image embeddings
    return pipe, embeds


def test_ip_adapter_processors_stay_and_their_branch_still_acts():
    pipe, embeds = ip_adapter_pipeline()
    kwargs = lambda: tiny_call_kwargs("sd15", ip_adapter_image_embeds=embeds)  # noqa: E731
    processors = dict(pipe.unet.attn_processors)
    stock = pipe(PROMPT, **kwargs()).images
    with apply(pipe):
        assert torch.equal(pipe(PROMPT, **kwargs()).images, stock)
    controls = {
        "perturb": lambda: Perturb(scale=2.0),  # SD1.5's mid-block attn1, rows joining late (share_prefix)
        "maps": lambda: Maps(words=["circle"]),
        "regions": lambda: Regions(regions=[{"phrase": "red circle", "box": [0.0, 0.0, 0.5, 1.0]}], mode="hard",
                                   window={"start": 0, "stop": 1}),
    }
    for name, make in controls.items():
        control = make()
        with apply(pipe, control) as session:
            assert dict(pipe.unet.attn_processors) == processors  # the very same IP-Adapter objects
            full = pipe(PROMPT, **kwargs()).images
            pipe.set_ip_adapter_scale(0.0)
            without_ip = pipe(PROMPT, **kwargs()).images
            pipe.set_ip_adapter_scale(1.0)
        assert (full - without_ip).abs().max() > 1e-2, name  # the image prompt still changes the output
        assert session.last_run()["controls"].get(control.name), name  # the control acted
        if name != "maps":  # maps only reads the attention
            assert (full - stock).abs().max() > 1e-4, name
        else:
            assert torch.equal(full, stock)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0",
                                                                              "IPAdapterAttnProcessor2_0"}


def test_ip_adapter_maps_see_the_text_call_only():
    pipe, embeds = ip_adapter_pipeline()
    seen = []

    class Probe(HookAll):
        def on_attention(self, call):
            if call.site.kind == "cross":
                seen.append((call.k.shape[2], call.text))

    with apply(pipe, Probe()):
        pipe(PROMPT, **tiny_call_kwargs("sd15", ip_adapter_image_embeds=embeds))
    assert seen and all(keys == 77 and text == slice(0, 77) for keys, text in seen)  # never the 4 image tokens


# -- (2) attention backends are kept -------------------------------------------------------------------------
def test_outputs_with_no_control_equal_stock_bit_for_bit(family):
    pipe = tiny_pipeline(family)
    stock = pipe(PROMPT, **tiny_call_kwargs(family)).images
    with apply(pipe):
        ours = pipe(PROMPT, **tiny_call_kwargs(family)).images
    assert torch.equal(ours, stock)


def test_flux_calls_no_control_touches_reach_the_chosen_backend(monkeypatch):
    from diffusers.models import attention_dispatch
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    from diffusers.models.transformers import transformer_flux

    chosen = AttentionBackendName._NATIVE_MATH  # not the default ("native"): a dropped choice would show
    original = _AttentionBackendRegistry._backends[chosen]
    calls = []

    def spy(**kwargs):
        calls.append(kwargs["query"].shape)
        return original(**kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, chosen, spy)
    pipe = tiny_pipeline("flux")
    pipe.transformer.set_attention_backend(chosen.value)
    processors = dict(pipe.transformer.attn_processors)
    stock = pipe(PROMPT, **tiny_call_kwargs("flux")).images
    n_stock = len(calls)
    n_sites = len(processors)
    assert n_stock > 0 and n_stock % n_sites == 0
    calls.clear()
    with apply(pipe) as session:
        plain = pipe(PROMPT, **tiny_call_kwargs("flux")).images
    assert torch.equal(plain, stock) and len(calls) == n_stock
    site = session.sites[-1].name  # one single-stream block
    calls.clear()
    with apply(pipe, HookAll([site])):
        assert transformer_flux.dispatch_attention_fn is not attention_dispatch.dispatch_attention_fn  # patched
        assert all(p._attention_backend == chosen.value for p in pipe.transformer.attn_processors.values())
        hooked = pipe(PROMPT, **tiny_call_kwargs("flux")).images
    # every call but the hooked site's went to the chosen backend; the hooked one went through the engine
    assert len(calls) == n_stock - n_stock // n_sites
    assert (hooked - stock).abs().max() <= 1e-5
    assert transformer_flux.dispatch_attention_fn is attention_dispatch.dispatch_attention_fn  # removed on exit
    assert dict(pipe.transformer.attn_processors) == processors


def test_dispatch_patch_is_shared_and_removed_by_the_last_session():
    from diffusers.models import attention_dispatch
    from diffusers.models.transformers import transformer_flux

    first, second = tiny_pipeline("flux"), tiny_pipeline("flux")
    with apply(first, HookAll()):
        patched = transformer_flux.dispatch_attention_fn
        with apply(second, HookAll()):
            assert transformer_flux.dispatch_attention_fn is patched  # installed once
            second(PROMPT, **tiny_call_kwargs("flux"))
        assert transformer_flux.dispatch_attention_fn is patched  # the first session still needs it
        first(PROMPT, **tiny_call_kwargs("flux"))
    assert transformer_flux.dispatch_attention_fn is attention_dispatch.dispatch_attention_fn


# -- (3) a user's processor subclass ---------------------------------------------------------------------------
class HalfProcessor(AttnProcessor2_0):
    """A user's processor: diffusers' own, with its output halved."""

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) * 0.5


@pytest.mark.parametrize("make, site", [(lambda: Maps(words=["circle"], layers=[SD15_CROSS]), SD15_CROSS),
                                        (lambda: Perturb(scale=2.0, layers=[SD15_SITE]), SD15_SITE)],
                         ids=["maps", "perturb"])
def test_user_processor_subclass_keeps_running(make, site):
    pipe = tiny_pipeline("sd15")
    kwargs = lambda: tiny_call_kwargs("sd15")  # noqa: E731
    plain_control = make()
    with apply(pipe, plain_control):
        without_user = pipe(PROMPT, **kwargs()).images
    user = HalfProcessor()
    pipe.unet.get_submodule(site).set_processor(user)
    stock_user = pipe(PROMPT, **kwargs()).images
    control = make()
    with apply(pipe, control) as session:
        assert pipe.unet.get_submodule(site).processor is user
        with_user = pipe(PROMPT, **kwargs()).images
    assert session.last_run()["controls"][control.name]
    assert (with_user - without_user).abs().max() > 1e-3  # the halving still happens under the control
    if control.name == "maps":  # reads only: exactly the user's stock output
        assert (with_user - stock_user).abs().max() <= 1e-5
        assert control.maps["circle"].abs().sum() > 0


# -- (4) no copied processor remains ---------------------------------------------------------------------------
def test_no_copied_processor_class_remains():
    package = pathlib.Path(attnctl.__file__).parent
    old = re.compile(r"\b(UNetProcessor|SD3Processor|FluxProcessor|AttnctlProcessor|split_heads)\b")
    hits = [f"{path}:{i}" for path in package.rglob("*.py")
            for i, line in enumerate(path.read_text().splitlines(), 1) if old.search(line)]
    assert hits == []
    assert not (package / "adapters" / "processor.py").exists()


# -- (5) processors attnctl cannot place ------------------------------------------------------------------------
class ManualSoftmaxProcessor:
    """Attention by hand (no SDPA, no dispatcher): attnctl cannot see its call."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, d = hidden_states.shape[0], attn.to_q.out_features // attn.heads
        q, k, v = (x.view(b, -1, attn.heads, d).transpose(1, 2)
                   for x in (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)))
        out = self.attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))

    def attention(self, q, k, v):
        """(B, H, S, D) -> (B, H, Sq, D)"""
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


class TwiceProcessor(AttnProcessor2_0):
    """Calls SDPA once more after diffusers' processor: more calls than attnctl knows for it. (Had the extra
    call come first, its lengths would not match the layer's and that would be the error.)"""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = super().__call__(attn, hidden_states, *args, **kwargs)
        q = hidden_states.new_zeros(1, 1, 2, 4)
        return out + F.scaled_dot_product_attention(q, q, q).sum()


@pytest.mark.parametrize("processor, message", [
    (ManualSoftmaxProcessor, r"attn1 \(processor ManualSoftmaxProcessor\).*without calling"),
    (TwiceProcessor, r"attn1 \(processor TwiceProcessor, attention call #2\) makes more attention calls"),
])
def test_processor_attnctl_cannot_place(processor, message):
    pipe = tiny_pipeline("sd15")
    pipe.unet.get_submodule(SD15_SITE).set_processor(processor())
    kwargs = lambda: tiny_call_kwargs("sd15")  # noqa: E731
    stock = pipe(PROMPT, **kwargs()).images
    with apply(pipe):  # no control on it: it runs untouched
        assert torch.equal(pipe(PROMPT, **kwargs()).images, stock)
    others = [s for s in attnctl.engine.Session(pipe).sites if s.name != SD15_SITE]
    with apply(pipe, HookAll([s.name for s in others])):  # controls elsewhere: still untouched here
        assert (pipe(PROMPT, **kwargs()).images - stock).abs().max() <= 1e-5
    with pytest.raises(ProcessorError, match=message):
        with apply(pipe, HookAll([SD15_SITE])):
            pipe(PROMPT, **kwargs())
    assert torch.equal(pipe(PROMPT, **kwargs()).images, stock)  # restored after the error


class ScaledSDPAProcessor(ManualSoftmaxProcessor):
    """SDPA with a softmax scale of its own: the engine's controls assume 1 / sqrt(head_dim)."""

    def attention(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.3)


def test_controlled_call_with_an_option_the_engine_cannot_honour():
    pipe = tiny_pipeline("sd15")
    pipe.unet.get_submodule(SD15_SITE).set_processor(ScaledSDPAProcessor())
    with apply(pipe):  # no control on it: fine
        pipe(PROMPT, **tiny_call_kwargs("sd15"))
    message = r"attn1 \(processor ScaledSDPAProcessor, attention call #1\) calls attention with scale=0.3"
    with pytest.raises(ProcessorError, match=message):
        with apply(pipe, HookAll([SD15_SITE])):
            pipe(PROMPT, **tiny_call_kwargs("sd15"))


# -- (6) torch.compile ---------------------------------------------------------------------------------------
@pytest.mark.slow  # inductor on CPU compiles for minutes (the engine's wrappers graph-break and recompile)
@pytest.mark.parametrize("make", [lambda: Maps(words=["circle"]), lambda: Perturb(scale=2.0)], ids=["maps", "perturb"])
def test_compiled_unet_under_a_control_matches_eager(make):
    pipe = tiny_pipeline("sd15")

    def run():
        control = make()
        with apply(pipe, control):
            images = pipe(PROMPT, **tiny_call_kwargs("sd15", steps=2)).images
        return images, control

    eager, eager_control = run()
    pipe.unet.compile()  # in place: the pipeline still holds a UNet2DConditionModel
    compiled, compiled_control = run()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    if isinstance(eager_control, Maps):
        torch.testing.assert_close(compiled_control.maps["circle"], eager_control.maps["circle"], atol=1e-6, rtol=1e-4)
