"""Attention interpolation (AID / PAID): the maths against float64 references, then the control on every family."""

import math

import pytest
import torch
from PIL import Image

from attnctl import interpolation as maths
from attnctl.errors import ControlError

# -- interpolated attention ----------------------------------------------------------------------------------


def _qkv(rows=3, heads=2, sq=10, sk=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, sq, d, generator=g)
    ka, va, kb, vb = (torch.randn(rows, heads, sk, d, generator=g) for _ in range(4))
    ks, vs = torch.randn(rows, heads, sq, d, generator=g), torch.randn(rows, heads, sq, d, generator=g)
    return q, ka, va, kb, vb, ks, vs


def _attention64(q, k, v):
    weights = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v.double()


def test_inner_at_half_is_attention_on_averaged_keys_and_values():
    q, ka, va, kb, vb, _, _ = _qkv(seed=1)
    ours = maths.interpolated_attention(q, ka, va, kb, vb, torch.full((3,), 0.5), mode="inner")
    reference = _attention64(q, (ka.double() + kb.double()) / 2, (va.double() + vb.double()) / 2)
    assert (ours.double() - reference).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["inner", "outer"])
@pytest.mark.parametrize("fuse", [False, True])
def test_interpolated_attention_matches_float64_reference(mode, fuse):
    q, ka, va, kb, vb, ks, vs = _qkv(seed=2)
    t = torch.tensor([0.1, 0.5, 0.93])
    extra = dict(k_self=ks, v_self=vs) if fuse else {}
    ours = maths.interpolated_attention(q, ka, va, kb, vb, t, mode=mode, **extra)
    reference = maths.interpolated_attention_reference(q, ka, va, kb, vb, t, mode=mode, **extra)
    sdpa_error = (torch.nn.functional.scaled_dot_product_attention(q, ka, va).double() - _attention64(q, ka, va))
    assert ours.shape == q.shape
    assert (ours.double() - reference).abs().max() <= max(4 * sdpa_error.abs().max(), 2e-6)
    if not fuse:  # the reference itself against plain attention: outer is a blend of two attentions
        expected = ((1 - t.double()).reshape(-1, 1, 1, 1) * _attention64(q, ka, va) +
                    t.double().reshape(-1, 1, 1, 1) * _attention64(q, kb, vb))
        if mode == "outer":
            assert (reference - expected).abs().max() < 1e-12
        else:
            assert (reference - expected).abs().max() > 1e-3  # inner is not the blend


@pytest.mark.parametrize("mode", ["inner", "outer"])
def test_endpoints_are_plain_attention(mode):
    q, ka, va, kb, vb, _, _ = _qkv(rows=2, seed=3)
    out = maths.interpolated_attention(q, ka, va, kb, vb, torch.tensor([0.0, 1.0]), mode=mode)
    assert (out[0].double() - _attention64(q[:1], ka[:1], va[:1])[0]).abs().max() < 1e-5
    assert (out[1].double() - _attention64(q[1:], kb[1:], vb[1:])[0]).abs().max() < 1e-5


def test_fusion_with_own_keys_equal_to_an_endpoint_changes_nothing():
    """[K, K] with equal values is the same attention as K: a fused endpoint frame is its plain self."""
    q, ka, va, kb, vb, _, _ = _qkv(rows=1, sq=7, seed=4)
    fused = maths.interpolated_attention(q, ka, va, kb, vb, torch.zeros(1), mode="outer", k_self=ka, v_self=va)
    assert (fused.double() - _attention64(q, ka, va)).abs().max() < 1e-5


def test_mismatched_endpoint_lengths_are_an_error():
    q, ka, va, kb, vb, _, _ = _qkv()
    with pytest.raises(ControlError, match="different shapes.*cannot pad"):
        maths.interpolated_attention(q, ka, va, kb[:, :, :5], vb[:, :, :5], torch.zeros(3))
    with pytest.raises(ControlError, match="unknown interpolation mode 'middle'; allowed: inner, outer"):
        maths.interpolated_attention(q, ka, va, kb, vb, torch.zeros(3), mode="middle")


# -- Beta coefficients -----------------------------------------------------------------------------------------


def test_beta_cdf_against_closed_forms():
    x = torch.linspace(0, 1, 21, dtype=torch.float64)
    cases = [((1, 1), x), ((1, 3), 1 - (1 - x) ** 3), ((2, 1), x**2), ((0.5, 0.5), 2 / math.pi * torch.asin(x.sqrt())),
             ((2, 2), 3 * x**2 - 2 * x**3)]
    for (a, b), expected in cases:
        assert (maths.beta_cdf(x, a, b) - expected).abs().max() < 1e-12, (a, b)
    g = torch.Generator().manual_seed(0)
    a, b, x = torch.rand(50, generator=g) * 30 + 0.1, torch.rand(50, generator=g) * 30 + 0.1, torch.rand(50, generator=g)
    assert (maths.beta_cdf(x, a, b) + maths.beta_cdf(1 - x, b, a) - 1).abs().max() < 1e-10  # symmetry


def test_beta_quantiles():
    assert maths.beta_quantiles(2, 3, 3) == [0.0, 1.0]
    uniform = maths.beta_quantiles(5, 1, 1)
    assert max(abs(u - i / 4) for i, u in enumerate(uniform)) < 1e-8
    root = maths.beta_quantiles(6, 2, 1)  # CDF x^2 -> quantile sqrt(p)
    assert max(abs(r - math.sqrt(i / 5)) for i, r in enumerate(root)) < 1e-8
    crowded = maths.beta_quantiles(7, 25, 25)
    assert crowded[0] == 0.0 and crowded[-1] == 1.0 and all(a < b for a, b in zip(crowded, crowded[1:]))
    assert 0.4 < crowded[1] and crowded[-2] < 0.6  # alpha = beta > 1 crowds frames around the middle
    for bad in [(0, 1), (1, -2)]:
        with pytest.raises(ControlError, match="alpha > 0 and beta > 0"):
            maths.beta_quantiles(5, *bad)
    with pytest.raises(ControlError, match="at least 2 frames"):
        maths.beta_quantiles(1, 1, 1)


def test_fit_beta_recovers_parameters_and_evens_out_jumps():
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    alpha, beta = maths.fit_beta(t, maths.beta_cdf(t, 4.0, 1.5))
    assert abs(math.log(alpha / 4.0)) < 0.05 and abs(math.log(beta / 1.5)) < 0.05
    # A path whose change happens in a sharp step at t = 0.5: the fitted spacing crowds the middle.
    distances = [0.1, 0.1, 0.5, 3.0, 3.0, 0.5, 0.1, 0.1]
    alpha, beta = maths.fit_beta(t, maths.cumulative_distance(distances))
    assert alpha > 2 and beta > 2 and abs(math.log(alpha / beta)) < 0.2


# -- latents, distances, metrics, outputs -----------------------------------------------------------------------


def test_slerp():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.equal(maths.slerp(a, b, 0.0), a) and torch.equal(maths.slerp(a, b, 1.0), b)
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = maths.slerp(x, y, 0.5)
    assert torch.allclose(mid, torch.tensor([1.0, 1.0]) / math.sqrt(2))  # on the circle, not the chord
    assert torch.allclose(maths.slerp(x, 2 * x, 0.5), 1.5 * x)  # parallel: linear


def test_distances_and_sequence_metrics():
    white, black = Image.new("RGB", (16, 16), (255, 255, 255)), Image.new("RGB", (16, 16), (0, 0, 0))
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    assert maths.frame_distances([white, white], "lab") == [0.0]
    assert abs(maths.frame_distances([white, black], "lab")[0] - 100.0) < 1e-3  # L* from 100 to 0
    assert abs(maths.frame_distances([white, red], "lab")[0] - 114.6) < 0.5  # CIE76 white -> sRGB red
    noise = Image.effect_noise((16, 16), 60).convert("RGB")
    assert abs(maths.frame_distances([noise, noise], "ssim")[0]) < 1e-9
    assert maths.frame_distances([noise, white], "ssim")[0] > 0.5
    with pytest.raises(ControlError, match="unknown distance 'l2'"):
        maths.frame_distances([white, black], "l2")
    assert maths.smoothness([1.0, 1.0, 1.0]) == 1.0 and maths.consistency([1.0, 2.0, 3.0]) == 2.0
    assert maths.smoothness([0.0, 0.0, 3.0]) == pytest.approx(1 - 2 / 3)  # one jump holds everything
    assert maths.gini([0.0, 0.0]) == 0.0


def test_strip_and_gif():
    frames = [Image.new("RGB", (8, 6), (20 * i, 0, 0)) for i in range(4)]
    strip = maths.contact_strip(frames, gap=2)
    assert strip.size == (4 * 8 + 3 * 2, 6) and strip.getpixel((10, 0)) == (20, 0, 0)
    import io

    gif = Image.open(io.BytesIO(maths.gif_bytes(frames)))
    assert gif.format == "GIF" and gif.n_frames == 6  # forward, then back without repeating the ends


# -- the control on every family ---------------------------------------------------------------------------------

from attnctl.controls.interpolate import FramePlan, Interpolate, check_prompt_lengths  # noqa: E402
from attnctl.engine import apply  # noqa: E402
from attnctl.testing import TINY_FAMILIES, tiny_call_kwargs, tiny_pipeline  # noqa: E402

A, B, C = "a red circle", "a blue square", "a green triangle"


def _kwargs(family, steps=3, seed=0, **extra):
    kwargs = tiny_call_kwargs(family, steps=steps, seed=seed, **extra)
    kwargs.pop("generator")
    return kwargs


def _plain(pipe, family, prompt, seed=0, steps=3):
    return pipe(prompt=prompt, **tiny_call_kwargs(family, steps=steps, seed=seed)).images[0]


def _processors(pipe):
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    # every attention module's processor (Z-Image's transformer has no ``attn_processors``)
    return {name: module.processor for name, module in denoiser.named_modules() if hasattr(module, "processor")}


# tiny:flux2-dev's prompts move its output 5x less than tiny:flux2's (0.004 between A's and B's images: no CFG to
# amplify the text, only a guidance embedding), below this test's absolute thresholds; its interpolation is checked
# relative to that gap in test_family_flux2.py.
@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "flux2-dev"])
def test_endpoints_are_the_plain_generations_and_frames_are_coupled(family):
    pipe = tiny_pipeline(family)
    before = _processors(pipe)
    result = Interpolate(prompts=[A, B], frames=4, fuse=False).generate(pipe, seed=0, **_kwargs(family))
    frames = torch.stack(result.frames)  # latents: output_type="latent"
    assert frames.shape[0] == 4 and result.plan.anchors == (0, 3)
    assert (frames[0] - _plain(pipe, family, A)).abs().max() <= 1e-4
    assert (frames[3] - _plain(pipe, family, B)).abs().max() <= 1e-4
    assert _processors(pipe) == before  # generate applied itself and restored everything
    naive = torch.stack(Interpolate(prompts=[A, B], frames=4, mode="embedding").generate(
        pipe, seed=0, **_kwargs(family)).frames)
    assert (naive[0] - frames[0]).abs().max() <= 1e-4
    assert (naive[1:3] - frames[1:3]).abs().max() > 5e-4  # attention interpolation changes in-between frames
    assert (frames[1] - frames[0]).abs().max() > 1e-3 and (frames[1] - frames[2]).abs().max() > 1e-3


def test_fused_inner_outer_and_heads_on_sd15():
    pipe = tiny_pipeline("sd15")
    kwargs = _kwargs("sd15", steps=2)
    outputs = {}
    for mode in ("inner", "outer"):
        for fuse in (False, True):
            frames = Interpolate(prompts=[A, B], frames=3, mode=mode, fuse=fuse).generate(pipe, **kwargs).frames
            outputs[mode, fuse] = frames[1]
            assert (frames[0] - _plain(pipe, "sd15", A, steps=2)).abs().max() <= 1e-4  # also when fused
    values = list(outputs.values())
    assert all((a - b).abs().max() > 1e-4 for i, a in enumerate(values) for b in values[i + 1:])
    headed = Interpolate(prompts=[A, B], frames=3, layers=["down_blocks.1:heads=0"]).generate(pipe, **kwargs)
    assert (headed.frames[1] - outputs["outer", True]).abs().max() > 1e-4


def test_chain_of_prompts_and_slerped_seeds():
    pipe = tiny_pipeline("sd15")
    control = Interpolate(prompts=[A, B, C], frames=3, latents="slerp", seeds=[1, 2, 3], fuse=False)
    result = control.generate(pipe, **_kwargs("sd15", steps=2))
    assert result.plan.anchors == (0, 2, 4) and len(result.frames) == 5
    for frame, prompt, seed in [(0, A, 1), (2, B, 2), (4, C, 3)]:
        assert (result.frames[frame] - _plain(pipe, "sd15", prompt, seed=seed, steps=2)).abs().max() <= 1e-4
    assert result.metadata["t"] == [0.0, 0.5, 1.0, 1.5, 2.0]
    shared = Interpolate(prompts=[A, B, C], frames=3, fuse=False).generate(pipe, seed=1, **_kwargs("sd15", steps=2))
    assert (shared.frames[1] - result.frames[1]).abs().max() > 1e-3  # slerped noise differs from seed 1's


def test_paid_guide_prompt_and_warmup():
    pipe = tiny_pipeline("sd15")
    kwargs = _kwargs("sd15", steps=4)
    counts = {}
    for warmup in (0.5, 1.0):
        control = Interpolate(prompts=[A, B], frames=3, guide_prompt=C, warmup=warmup)
        result = control.generate(pipe, **kwargs)
        counts[warmup] = control.calls
        assert (result.frames[2] - _plain(pipe, "sd15", B, steps=4)).abs().max() <= 1e-4
    assert counts[1.0] == 2 * counts[0.5] > 0  # interpolated attention only in the first half of the steps
    aid = Interpolate(prompts=[A, B], frames=3).generate(pipe, **kwargs)
    assert (aid.frames[1] - result.frames[1]).abs().max() > 1e-3  # the guide prompt conditions the middle


def test_frame_plan():
    plan = FramePlan.build([A, B, C], [[0, 0.3, 1], [0, 0.5, 0.8, 1]])
    assert plan.n_frames == 6 and plan.anchors == (0, 2, 5) and plan.between() == [1, 3, 4]
    assert plan.left[4] == 2 and plan.right[4] == 5 and plan.t[4] == 0.8
    assert plan.frame_prompts(None) == [A, A, B, B, B, C] and plan.frame_prompts("g")[1] == "g"


@pytest.mark.parametrize("options, message", [
    (dict(frames=1), r"frames = 1: .*greater than or equal to 2"),
    (dict(alpha=0), r"alpha = 0: .*greater than 0"),
    (dict(beta=-1.5), r"beta = -1.5: .*greater than 0"),
    (dict(mode="middle"), r"mode = 'middle': .*'outer', 'inner' or 'embedding'"),
    (dict(spacing="linear"), r"spacing = 'linear'"),
    (dict(prompts=["only one"]), r"at least 2 non-empty prompts"),
    (dict(fuze=True), r"unknown key 'fuze' \(did you mean 'fuse'\?\)"),
])
def test_bad_options(options, message):
    with pytest.raises(ControlError, match=message):
        Interpolate(**options)


def test_bad_calls():
    pipe = tiny_pipeline("sd15")
    with pytest.raises(ControlError, match="at least 2 prompts"):
        Interpolate().generate(pipe, prompts=[A], **_kwargs("sd15"))
    with pytest.raises(ControlError, match=r"tokenises to \d+ tokens.*pads every prompt to"):
        check_prompt_lengths(pipe, [A, " ".join(["red"] * 90)])
    with pytest.raises(ControlError, match="generator"):
        Interpolate(prompts=[A, B]).generate(pipe, generator=torch.Generator(), **_kwargs("sd15"))
    with pytest.raises(ControlError, match="one per prompt"):
        Interpolate(prompts=[A, B], latents="slerp", seeds=[1]).generate(pipe, **_kwargs("sd15"))
    with apply(pipe, Interpolate(prompts=[A, B])):
        with pytest.raises(ControlError, match=r"call control.generate"):
            pipe([A, B], **tiny_call_kwargs("sd15"))


def test_images_metrics_and_auto_spacing():
    pipe = tiny_pipeline("sd15")
    kwargs = _kwargs("sd15", steps=2, output_type="pil")
    control = Interpolate(prompts=[A, B], frames=5, spacing="auto", distance="ssim")
    result = control.generate(pipe, **kwargs)
    meta = result.metadata
    assert len(result.frames) == 5 and isinstance(result.frames[0], Image.Image)
    assert len(meta["distances"]) == 4 and meta["distance"] == "ssim"
    assert meta["consistency"] == pytest.approx(sum(meta["distances"]) / 4, abs=1e-5)
    assert 0 <= meta["smoothness"] <= 1
    (alpha, beta), = meta["alpha_beta"]
    assert meta["t"][1:-1] == pytest.approx(maths.beta_quantiles(5, alpha, beta)[1:-1], abs=1e-6)
    assert len(meta["auto"][0]["probe_distances"]) == 4
    assert result.strip().size == (5 * 32 + 4 * 2, 32)


def test_recipe_run_writes_frames_strip_gif_and_metrics(tmp_path):
    import json

    import yaml

    from attnctl.recipe import load_recipe
    from attnctl.run import run_recipe

    recipe = load_recipe({"model": "tiny:sd15", "prompt": [A, B], "seeds": [3, 4], "steps": 2, "height": 32,
                          "width": 32, "controls": {"interpolate": {"frames": 4, "spacing": "uniform"}}})
    folder = run_recipe(recipe, out=tmp_path, progress=False)
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "complete" and len(record["images"]) == 2  # one sequence per seed
    entry = record["images"][1]
    frames = [name for key, name in entry["files"].items() if key.startswith("frame")]
    assert entry["seed"] == 4 and entry["prompt"] == [A, B] and len(frames) == 4
    assert Image.open(folder / frames[0]).text["attnctl:seed"] == "4"
    assert Image.open(folder / entry["file"]).size == (4 * 32 + 3 * 2, 32)  # the strip is the item's image
    assert Image.open(folder / entry["files"]["interpolation.gif"]).n_frames == 6
    assert Image.open(folder / record["contact_sheet"]).size == (2 * round((4 * 32 + 3 * 2) * 128 / 32), 128 + 14)
    meta = entry["info"]
    assert meta["t"] == pytest.approx([0, 1 / 3, 2 / 3, 1]) and len(meta["distances"]) == 3
    assert {"smoothness", "consistency", "distance"} <= set(meta)
    # The strip's embedded recipe is that one sequence: every prompt (one image), its seed; it re-runs the strip.
    strip = Image.open(folder / entry["file"])
    single = load_recipe(yaml.safe_load(strip.text["attnctl:recipe"]))
    assert single.prompt == [A, B] and single.seed_list == [4]
    again = run_recipe(single, out=tmp_path / "again", progress=False)
    (again_entry,) = json.loads((again / "run.json").read_text())["images"]
    assert Image.open(again / again_entry["file"]).tobytes() == strip.tobytes()


def test_interp_eval_suite(tmp_path):
    import json

    from attnctl.evals import run_eval
    from attnctl.evals.interp import builtin_pairs

    pairs = builtin_pairs()
    assert len(pairs) >= 20 and len(set(pairs)) == len(pairs) and all(a != b for a, b in pairs)
    prompts = tmp_path / "pairs.txt"
    prompts.write_text("a red circle | a blue square\n# comment\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prompt: x\nsteps: 2\nheight: 32\nwidth: 32\ncontrols:\n  interpolate: {frames: 4}\n")
    out = tmp_path / "interp.json"
    report = run_eval("interp", model="tiny:sd15", recipe=str(recipe), prompts=str(prompts), seeds=1,
                      json_path=str(out), progress=False)
    saved = json.loads(out.read_text())
    assert saved["n"] == 1 and saved["distance"] == "lab" and set(saved["delta_ci95"]) == set(report["baseline"])
    row = saved["rows"][0]
    assert len(row["baseline"]["distances"]) == len(row["controlled"]["distances"]) == 3  # same frame count
    assert row["baseline"]["t"] == pytest.approx([0, 1 / 3, 2 / 3, 1])  # naive: uniform
    assert row["baseline"]["distances"] != row["controlled"]["distances"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a red circle\n")
    with pytest.raises(Exception, match=r"write 'prompt A \| prompt B'"):
        run_eval("interp", model="tiny:sd15", recipe=str(recipe), prompts=str(bad), progress=False)


def test_on_attention_couples_rows_and_keeps_masks_and_heads():
    """One hand-built joint call: rows [uncond x3, cond x3], frames (A, mid, B); a mask hides key 5 from row 4."""
    from types import SimpleNamespace

    from attnctl.engine import BatchLayout, StepInfo

    control = Interpolate(prompts=[A, B], frames=3, mode="inner")
    control._plan = FramePlan.build([A, B], [[0.0, 0.25, 1.0]])
    control._active_window = control._window()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 9, 4, generator=g) for _ in range(3))
    bias = torch.zeros(6, 1, 9, 9)
    bias[4, :, :, 5] = float("-inf")
    hooks = []
    call = SimpleNamespace(q=q, k=k, v=v, bias=bias, image=slice(2, 9), heads=(1,), then=hooks.append,
                           layout=BatchLayout(("uncond",) * 3 + ("cond",) * 3, (0, 1, 2, 0, 1, 2)),
                           step=StepInfo(0, 4, 0.0, 999.0))
    control.on_attention(call)
    (fn,) = hooks
    plain = torch.randn(6, 2, 9, 4, generator=g)
    out = fn(plain)
    changed = (out != plain).any(-1)  # (rows, heads, queries)
    assert changed[4, 1, 2:].all() and not changed[4, 0].any() and not changed[4, 1, :2].any()
    assert not changed[[0, 1, 2, 3, 5]].any()  # uncond rows and the endpoints stay plain
    keep = [i for i in range(9) if i != 5]
    kt, vt = torch.lerp(k[3], k[5], 0.25), torch.lerp(v[3], v[5], 0.25)
    own_and_t = torch.cat([k[4, 1:2, keep], kt[1:2, keep]], 1), torch.cat([v[4, 1:2, keep], vt[1:2, keep]], 1)
    expected = _attention64(q[4:5, 1:2, 2:], own_and_t[0][None], own_and_t[1][None])
    assert (out[4, 1, 2:].double() - expected[0, 0]).abs().max() < 1e-5
