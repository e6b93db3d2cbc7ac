"""``perturb`` (PAG / SoftPAG): options and errors, the SoftPAG blend against a float64 softmax reference,
head locality, parity with diffusers' PAG pipelines, the guidance formula with and without CFG (FLUX's true CFG
included), step windows, and the invariants on every family."""

import inspect

import pytest
import torch

from attnctl.attention import AttentionRequest, attend
from attnctl.controls.base import Control
from attnctl.controls.perturb import DEFAULT_LAYERS, Perturb, PerturbOptions, scale_at
from attnctl.engine import apply
from attnctl.errors import ControlError, SelectorError
from attnctl.testing import tiny_call_kwargs, tiny_pipeline
from recording import Recorder

PROMPT = "a red circle"
SD15_MID = "mid_block.attentions.0.transformer_blocks.0.attn1"


# -- options and errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"scale": -1.0}, r"scale = -1.0: Input should be greater than or equal to 0"),
    ({"u": 1.5}, r"u = 1.5: Input should be less than or equal to 1"),
    ({"targets": [{"layers": ["mid_block"], "u": -0.1}]}, r"targets.0.u = -0.1: .*greater than or equal to 0"),
    ({"layers": []}, r"layers = \[\]: List should have at least 1 item"),
    ({"targets": []}, r"targets = \[\]: List should have at least 1 item"),
    ({"layers": ["mid_block"], "targets": [{"layers": ["mid_block"]}]}, r"either `layers`.*or `targets`"),
    ({"targets": [{"layers": ["mid_block"]}], "u": 0.5}, r"`u` applies to `layers`"),
    ({"mode": "text"}, r"mode = 'text': Input should be 'full' or 'image'"),
    ({"schedule": "step"}, r"schedule = 'step'"),
    ({"scal": 1.0}, r"unknown key 'scal' \(did you mean 'scale'\?\)"),
])
def test_bad_options_name_field_value_and_range(options, message):
    with pytest.raises(ControlError, match=message):
        Perturb(options)


@pytest.mark.parametrize("layers, message", [
    ([f"{SD15_MID}:heads=4"], r"head 4 does not exist in mid_block.*4 heads \(0-3\)"),
    (["mid_block.attentions.0.transformer_blocks.0.attn2"], r"matches no attention layer among joint/self/single"),
    (["up_blocks.7"], r"'up_blocks.7' matches no attention layer"),
])
def test_bad_selections_are_errors(layers, message):
    pipe = tiny_pipeline("sd15")
    with pytest.raises(SelectorError, match=message):
        with apply(pipe, Perturb(scale=1.0, layers=layers)):
            pass


def test_targets_resolve_to_per_head_strengths():
    pipe = tiny_pipeline("sd15")
    control = Perturb(targets=[{"layers": f"{SD15_MID}:heads=0,2", "u": 0.5},
                               {"layers": [f"{SD15_MID}:heads=2"], "u": 0.8},
                               {"layers": ["down_blocks.0"], "u": 1.0}])
    with apply(pipe, control):
        pass
    assert control.strengths[SD15_MID].tolist() == [0.5, 0.0, 0.8, 0.0]
    assert control.strengths["down_blocks.0.attentions.0.transformer_blocks.0.attn1"].tolist() == [1.0, 1.0]
    assert set(control.strengths) == {SD15_MID, "down_blocks.0.attentions.0.transformer_blocks.0.attn1"}


def test_scale_schedules():
    window = {"start": 0.2, "stop": 0.6}
    constant = PerturbOptions(scale=2.0, window=window)
    linear = PerturbOptions(scale=2.0, window=window, schedule="linear")
    cosine = PerturbOptions(scale=2.0, window=window, schedule="cosine")
    assert [scale_at(constant, p) for p in (0.0, 0.2, 0.5, 0.6)] == [0.0, 2.0, 2.0, 0.0]
    assert scale_at(linear, 0.2) == 2.0 and scale_at(linear, 0.4) == pytest.approx(1.0)
    assert scale_at(cosine, 0.2) == 2.0 and scale_at(cosine, 0.4) == pytest.approx(1.0)
    assert scale_at(cosine, 0.3) == pytest.approx(1.0 + 2 ** -0.5)


# -- the SoftPAG blend on the attention path, float64 ----------------------------------------------------------
def _softmax_reference(q, k, v, u, text=None, mode="full"):
    """Explicit float64 reference: A = softmax(q k^T / sqrt(d)); A' = (1 - u) A + u I' per (row, head), where I'
    is the identity (``full``) or, for ``image``, the map restricted to the text keys and the query's own token,
    with text rows untouched."""
    q, k, v, u = (t.double() for t in (q, k, v, u))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    probs = scores.softmax(-1)
    seq = q.shape[2]
    if mode == "full":
        identity = torch.eye(seq, dtype=torch.float64).expand_as(probs)
    else:
        allowed = torch.eye(seq, dtype=torch.bool)
        allowed[:, text] = True
        allowed[text, :] = True
        identity = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    weight = u[:, :, None, None]
    return ((1 - weight) * probs + weight * identity) @ v


@pytest.mark.parametrize("mode", ["full", "image"])
def test_softpag_blend_matches_float64_reference(mode):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 4, 12, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    u = torch.tensor([[0.0, 0.25, 1.0, 0.6], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    text = slice(8, 12)  # SD3 layout: [image; text]
    out = attend(AttentionRequest(q, k, v, u=u, mode=mode, text=text))
    torch.testing.assert_close(out, _softmax_reference(q, k, v, u, text, mode), atol=1e-12, rtol=0)
    plain = _softmax_reference(q, k, v, torch.zeros_like(u))
    torch.testing.assert_close(out[1], plain[1], atol=1e-12, rtol=0)  # u = 0: no perturbation
    if mode == "full":
        torch.testing.assert_close(out[2], v[2], atol=0, rtol=0)  # u = 1: the identity map, output V


class Probe(Control):
    """Records q, k, v and the final per-head output (B, H, S, D) of the attention calls at one site."""

    name = "probe"

    def __init__(self, site):
        super().__init__()
        self.site, self.calls = site, []

    def bind(self, session):
        return {self.site: None}

    def on_attention(self, call):
        record = {"q": call.q, "k": call.k, "v": call.v, "layout": call.layout, "text": call.text}
        self.calls.append(record)

        def keep(out):
            record["out"] = out
            return out

        call.then(keep)


@pytest.mark.parametrize("u", [0.0, 0.35, 1.0])
def test_softpag_in_a_pipeline_matches_float64_reference(u):
    """Through the real processor, in float64: the perturbed rows' selected head is (1 - u) Attn + u V."""
    pipe = tiny_pipeline("sd15", dtype=torch.float64)
    probe = Probe(SD15_MID)
    with apply(pipe, [Perturb(scale=1.0, targets=[{"layers": f"{SD15_MID}:heads=1", "u": u}]), probe]):
        pipe(PROMPT, **tiny_call_kwargs("sd15", steps=2))
    for record in probe.calls:
        strengths = torch.zeros(record["q"].shape[:2], dtype=torch.float64)
        strengths[record["layout"].rows("perturb"), 1] = u
        reference = _softmax_reference(record["q"], record["k"], record["v"], strengths)
        torch.testing.assert_close(record["out"], reference, atol=1e-10, rtol=0)
    # [uncond, cond, perturb] in one call; u = 0 everywhere adds no row at all
    assert all(len(r["layout"]) == (3 if u > 0 else 2) for r in probe.calls)


# -- head level ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, site", [("sd15", SD15_MID), ("sd3", "transformer_blocks.1.attn"),
                                          ("flux", "single_transformer_blocks.0.attn")])
def test_perturbing_heads_changes_only_those_heads(family, site):
    """At the (only) perturbed site the perturbed rows see the cond rows' inputs, so every head but the chosen
    one must give the cond rows' output exactly, and the chosen one must differ."""
    pipe = tiny_pipeline(family)
    probe = Probe(site)
    with apply(pipe, [Perturb(scale=1.0, layers=f"{site}:heads=1"), probe]):
        pipe(PROMPT, **tiny_call_kwargs(family, steps=2))
    for record in probe.calls:
        layout, out = record["layout"], record["out"]
        cond, perturbed = out[layout.rows("cond")], out[layout.rows("perturb")]
        others = [h for h in range(out.shape[1]) if h != 1]
        torch.testing.assert_close(perturbed[:, others], cond[:, others], atol=0, rtol=0)
        assert (perturbed[:, 1] - cond[:, 1]).abs().max() > 1e-4
        if record["text"] is not None:  # image mode: text queries keep their plain attention
            torch.testing.assert_close(perturbed[:, :, record["text"]], cond[:, :, record["text"]], atol=0, rtol=0)


# -- parity with diffusers' PAG pipelines ----------------------------------------------------------------------
def _pag_pipeline(family, pipe, layers):
    from diffusers import StableDiffusion3PAGPipeline, StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

    cls = {"sd15": StableDiffusionPAGPipeline, "sdxl": StableDiffusionXLPAGPipeline,
           "sd3": StableDiffusion3PAGPipeline}[family]
    accepted = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in accepted}
    pag = cls(**components, pag_applied_layers=layers)  # the exact layer list: no regex surprises
    pag.set_progress_bar_config(disable=True)
    return pag


def _sd3_without_qk_norm():
    """diffusers' SD3 PAG processors (PAGCFGJointAttnProcessor2_0, PAGJointAttnProcessor2_0) skip the module's
    norm_q/norm_k, so on SD3.5-style qk-norm models they are not the model they perturb (both their plain and
    perturbed paths change). Parity is therefore checked on an SD3 (no qk-norm) tiny model."""
    from diffusers import SD3Transformer2DModel

    pipe = tiny_pipeline("sd3")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.transformer = SD3Transformer2DModel.from_config({**pipe.transformer.config, "qk_norm": None}).eval()
    return pipe


PARITY = [
    ("sd15", [SD15_MID], 5.0, 0.0),
    ("sd15", [SD15_MID], 5.0, 0.7),  # diffusers rescales with the unmodified conditional prediction
    ("sd15", [SD15_MID, "down_blocks.1.attentions.0.transformer_blocks.0.attn1"], 1.0, 0.0),  # no CFG
    ("sdxl", ["mid_block.attentions.0.transformer_blocks.0.attn1",
              "mid_block.attentions.0.transformer_blocks.1.attn1"], 5.0, 0.0),
    ("sdxl", ["mid_block.attentions.0.transformer_blocks.1.attn1"], 5.0, 0.5),
    ("sd3", ["transformer_blocks.1.attn"], 5.0, 0.0),
    ("sd3", ["transformer_blocks.1.attn", "transformer_blocks.2.attn"], 1.0, 0.0),
]


@pytest.mark.parametrize("family, layers, cfg, rescale", PARITY)
def test_layer_pag_matches_diffusers_pag_pipelines(family, layers, cfg, rescale):
    """Final latents within 1e-4 (float32), same seeds and layers. On SD3 ``mode="image"`` (identity on the
    image->image block, text rows and columns untouched) is what diffusers' SD3 PAG processor computes."""
    pipe = _sd3_without_qk_norm() if family == "sd3" else tiny_pipeline(family)
    extra = {"guidance_rescale": rescale} if rescale else {}
    kwargs = lambda: tiny_call_kwargs(family, guidance_scale=cfg, **extra)  # noqa: E731
    reference = _pag_pipeline(family, pipe, layers)(PROMPT, pag_scale=2.5, **kwargs()).images
    with apply(pipe, Perturb(scale=2.5, layers=layers, mode="image")):
        ours = pipe(PROMPT, **kwargs()).images
    plain = pipe(PROMPT, **kwargs()).images
    assert (ours - reference).abs().max() <= 1e-4
    assert (plain - reference).abs().max() > 1e-2  # PAG did something the comparison can see


def test_sd3_full_mode_is_not_diffusers_pag():
    """``full`` also replaces the text rows and columns: a different perturbation from diffusers' SD3 PAG."""
    pipe = _sd3_without_qk_norm()
    layers = ["transformer_blocks.1.attn"]
    reference = _pag_pipeline("sd3", pipe, layers)(PROMPT, pag_scale=2.5, **tiny_call_kwargs("sd3")).images
    with apply(pipe, Perturb(scale=2.5, layers=layers, mode="full")):
        ours = pipe(PROMPT, **tiny_call_kwargs("sd3")).images
    assert (ours - reference).abs().max() > 1e-2


# -- the guidance formula, read off the denoiser and the scheduler ---------------------------------------------
# (a ``Recorder``, tests/recording.py, keeps every raw denoiser output and every scheduler input)
@pytest.mark.parametrize("true_cfg", [1.0, 3.0])
def test_flux_guidance_formula_with_and_without_true_cfg(true_cfg):
    """FLUX is guidance-distilled: no CFG batch. Without true CFG eps = cond + s (cond - perturbed); with true
    CFG (a negative prompt and true_cfg_scale > 1: a separate uncond call in cache_context("uncond")) eps =
    neg + t (cond - neg) + s (cond - perturbed), for t the true-CFG scale the engine never sees."""
    pipe = tiny_pipeline("flux")
    recorder = Recorder(pipe)
    kwargs = tiny_call_kwargs("flux", steps=3, true_cfg_scale=true_cfg)
    if true_cfg > 1:
        kwargs["negative_prompt"] = "a blue square"
    try:
        with apply(pipe, Perturb(scale=2.0, layers=["transformer_blocks.0", "single_transformer_blocks.1"])):
            pipe(PROMPT, **kwargs)
    finally:
        recorder.close()
    per_step = 2 if true_cfg > 1 else 1
    assert len(recorder.calls) == 3 * per_step and len(recorder.steps) == 3
    for i, eps in enumerate(recorder.steps):
        batched = recorder.calls[i * per_step]
        assert batched.shape[0] == 2  # [cond, perturbed] in one call
        cond, perturbed = batched[:1], batched[1:]
        expected = cond + 2.0 * (cond - perturbed)
        if true_cfg > 1:
            neg = recorder.calls[i * per_step + 1]
            assert neg.shape[0] == 1  # the uncond call has no perturbed rows
            expected = neg + true_cfg * (cond - neg) + 2.0 * (cond - perturbed)
        torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, cfg", [("sd15", 5.0), ("sd15", 1.0), ("sd3", 5.0), ("sd3", 1.0)])
def test_cfg_and_no_cfg_guidance_formula(family, cfg):
    """eps = uncond + w (cond - uncond) + s (cond - perturbed); without CFG (w <= 1) eps = cond + s (cond -
    perturbed); on the scheduler's input, from the raw rows of the one batched call."""
    pipe = tiny_pipeline(family)
    recorder = Recorder(pipe)
    try:
        with apply(pipe, Perturb(scale=1.5, window={"start": 0.0, "stop": 0.5})):  # family defaults
            pipe(PROMPT, **tiny_call_kwargs(family, steps=4, guidance_scale=cfg))
    finally:
        recorder.close()
    rows = [call.shape[0] for call in recorder.calls]
    n = 2 if cfg > 1 else 1
    assert rows == [n + 1, n + 1, n, n]  # steps outside the window cost nothing extra
    for raw, eps in zip(recorder.calls, recorder.steps):
        cond = raw[n - 1 : n]
        plain = raw[:1] + cfg * (cond - raw[:1]) if cfg > 1 else cond
        expected = plain + 1.5 * (cond - raw[n:]) if raw.shape[0] > n else plain
        torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-5)


# -- invariants on every family ------------------------------------------------------------------------------
def test_invariants_scale_zero_differs_restores(family):
    pipe = tiny_pipeline(family)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    processors = dict(denoiser.attn_processors)
    kwargs = lambda: tiny_call_kwargs(family)  # noqa: E731
    plain = pipe(PROMPT, **kwargs()).images
    with apply(pipe, Perturb(scale=0.0)) as session:
        zero = pipe(PROMPT, **kwargs()).images
    assert session.last_run()["controls"]["perturb"]["steps"] == []
    with apply(pipe, Perturb(scale=3.0)) as session:  # the family's default layers
        guided = pipe(PROMPT, **kwargs()).images
    diagnostics = session.last_run()["controls"]["perturb"]
    assert (zero - plain).abs().max() <= 1e-5
    assert (guided - plain).abs().max() > 1e-3
    assert diagnostics["steps"] == [0, 1, 2]
    assert all(name.startswith(DEFAULT_LAYERS[family][0]) for name in diagnostics["sites"])
    assert dict(denoiser.attn_processors) == processors
    assert "forward" not in denoiser.__dict__ and "step" not in pipe.scheduler.__dict__
    assert torch.equal(pipe(PROMPT, **kwargs()).images, plain)


# -- guidance scales near one ------------------------------------------------------------------------------------
NEAR_ONE = 1.0001


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_guidance_formula_is_exact_near_guidance_one(family):
    """At w = 1.0001 the scheduler's input is uncond + w (cond - uncond) + s (cond - perturbed) to float32
    precision (computed here in float64 from the raw rows). Folding PAG into the uncond rows as -delta / (w - 1)
    amplified delta 10^4-fold before the pipeline's CFG subtracted it back out (3.8e-4 off)."""
    pipe = tiny_pipeline(family)
    recorder = Recorder(pipe)
    try:
        with apply(pipe, Perturb(scale=1.5)):
            pipe(PROMPT, **tiny_call_kwargs(family, guidance_scale=NEAR_ONE))
    finally:
        recorder.close()
    worst = 0.0
    for raw, eps in zip(recorder.calls, recorder.steps):
        assert raw.shape[0] == 3
        uncond, cond, perturbed = (raw[i : i + 1].double() for i in range(3))
        expected = uncond + NEAR_ONE * (cond - uncond) + 1.5 * (cond - perturbed)
        worst = max(worst, (eps.double() - expected).abs().max().item())
    assert worst <= 1e-5, f"max abs difference {worst:.3g}"


@pytest.mark.parametrize("family, layers", [("sd15", [SD15_MID]),
                                            ("sdxl", ["mid_block.attentions.0.transformer_blocks.1.attn1"])])
def test_layer_pag_matches_diffusers_near_guidance_one(family, layers):
    pipe = tiny_pipeline(family)
    kwargs = lambda: tiny_call_kwargs(family, guidance_scale=NEAR_ONE)  # noqa: E731
    reference = _pag_pipeline(family, pipe, layers)(PROMPT, pag_scale=2.5, **kwargs()).images
    with apply(pipe, Perturb(scale=2.5, layers=layers, mode="image")):
        ours = pipe(PROMPT, **kwargs()).images
    difference = (ours - reference).abs().max().item()
    assert difference <= 1e-5, f"max abs difference {difference:.3g}"


# -- guidance rescale --------------------------------------------------------------------------------------------
RESCALE_LAYERS = {"sd15": [SD15_MID], "sdxl": ["mid_block.attentions.0.transformer_blocks.1.attn1"]}


def rescaled(noise_cfg, cond, rescale):
    """diffusers' ``rescale_noise_cfg`` (float64 in, float64 out)."""
    dims = list(range(1, noise_cfg.ndim))
    std_cond, std_cfg = cond.std(dim=dims, keepdim=True), noise_cfg.std(dim=dims, keepdim=True)
    return rescale * noise_cfg * (std_cond / std_cfg) + (1 - rescale) * noise_cfg


@pytest.mark.parametrize("cfg", [NEAR_ONE, 1.5, 7.5])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_layer_pag_with_guidance_rescale_matches_diffusers(family, cfg):
    """diffusers' PAG pipelines rescale uncond + w (cond - uncond) + s (cond - perturbed) by the std of the
    model's own cond prediction. attnctl folds PAG's delta into both rows (exact for any w) and gives the
    pipeline's rescale_noise_cfg the cond rows as predicted. (Folding into the uncond rows alone, -delta /
    (w - 1), was 3.7e-4 off at w = 1.0001.)"""
    pipe, layers = tiny_pipeline(family), RESCALE_LAYERS[family]
    kwargs = lambda: tiny_call_kwargs(family, guidance_scale=cfg, guidance_rescale=0.7)  # noqa: E731
    reference = _pag_pipeline(family, pipe, layers)(PROMPT, pag_scale=2.5, **kwargs()).images
    with apply(pipe, Perturb(scale=2.5, layers=layers, mode="image")):
        ours = pipe(PROMPT, **kwargs()).images
    plain = pipe(PROMPT, **kwargs()).images
    difference = (ours - reference).abs().max().item()
    assert difference <= 1e-5, f"max abs difference {difference:.3g}"
    assert (plain - reference).abs().max() > 1e-2  # PAG did something the comparison can see


@pytest.mark.parametrize("cfg", [NEAR_ONE, 1.5, 7.5])
def test_guidance_rescale_formula_from_the_raw_rows(cfg):
    """The scheduler's input is rescale(uncond + w (cond - uncond) + s (cond - perturbed), cond) to float32
    precision, recomputed in float64 from the one batched call's raw rows; with the std of the shifted cond rows
    (cond + s (cond - perturbed)) instead it is not."""
    pipe = tiny_pipeline("sd15")
    recorder = Recorder(pipe)
    try:
        with apply(pipe, Perturb(scale=1.5, layers=[SD15_MID])):
            pipe(PROMPT, **tiny_call_kwargs("sd15", guidance_scale=cfg, guidance_rescale=0.7))
    finally:
        recorder.close()
    assert len(recorder.calls) == len(recorder.steps) == 3
    worst, shifted_std = 0.0, 0.0
    for raw, eps in zip(recorder.calls, recorder.steps):
        assert raw.shape[0] == 3
        uncond, cond, perturbed = (raw[i : i + 1].double() for i in range(3))
        delta = 1.5 * (cond - perturbed)
        guided = uncond + cfg * (cond - uncond) + delta
        worst = max(worst, (eps.double() - rescaled(guided, cond, 0.7)).abs().max().item())
        shifted_std = max(shifted_std, (eps.double() - rescaled(guided, cond + delta, 0.7)).abs().max().item())
    assert worst <= 1e-5, f"max abs difference {worst:.3g}"
    assert shifted_std > 1e-3


def test_guidance_rescale_stand_in_is_the_pipelines_own_again_after_each_call_exit_and_error(monkeypatch):
    """The stand-in for the pipeline module's rescale_noise_cfg is in place only from the fold to the scheduler
    step: after a call, after leaving apply, and after a call that raised inside it, the module holds what it
    held before."""
    import sys

    pipe = tiny_pipeline("sd15")
    module = sys.modules[type(pipe).__module__]
    own = module.rescale_noise_cfg
    seen, fail_at = [], []

    def spy(noise_cfg, noise_pred_text, guidance_rescale=0.0):
        seen.append(module.rescale_noise_cfg is not spy)  # called through attnctl's stand-in
        if len(seen) in fail_at:
            raise RuntimeError("rescale failed")
        return own(noise_cfg, noise_pred_text, guidance_rescale=guidance_rescale)

    monkeypatch.setattr(module, "rescale_noise_cfg", spy)
    kwargs = lambda: tiny_call_kwargs("sd15", guidance_scale=5.0, guidance_rescale=0.7)  # noqa: E731
    with apply(pipe, Perturb(scale=2.0, layers=[SD15_MID])):
        pipe(PROMPT, **kwargs())
        assert seen == [True] * 3 and module.rescale_noise_cfg is spy
        fail_at.append(5)
        with pytest.raises(RuntimeError, match="rescale failed"):
            pipe(PROMPT, **kwargs())
        assert len(seen) == 5
        fail_at.clear()
        pipe(PROMPT, **kwargs())  # the failed call is closed when the next one starts
        assert seen == [True] * 8 and module.rescale_noise_cfg is spy
        fail_at.append(10)
        with pytest.raises(RuntimeError, match="rescale failed"):
            pipe(PROMPT, **kwargs())
        assert module.rescale_noise_cfg is not spy  # still in place after the error, until exit
    assert module.rescale_noise_cfg is spy
    assert pipe(PROMPT, **kwargs()).images is not None
    assert seen[-1] is False  # outside apply the pipeline calls its own function
