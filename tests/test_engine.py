"""The core engine: parity with stock diffusers, clean install/uninstall, and the four protocol kinds."""

import pytest
import torch

import attnctl
from attnctl.controls.base import Control
from attnctl.engine import apply
from attnctl.errors import ProcessorError
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

PROMPTS = ["a red circle", "a blue square on the left"]


class HookAll(Control):
    """Hooks every site and changes nothing: forces the controlled attention path."""

    name = "hook-all"

    def bind(self, session):
        return {site.name: None for site in session.sites}

    def on_attention(self, call):
        call.then(lambda out: out)


class Boom(HookAll):
    name = "boom"

    def on_attention(self, call):
        raise RuntimeError("boom")


def _state(pipe):
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return {
        "processors": {n: p for n, p in denoiser.attn_processors.items()},
        "forward": denoiser.__dict__.get("forward"),
        "step": pipe.scheduler.__dict__.get("step"),
        "encode": pipe.__dict__.get("encode_prompt"),
        "check": pipe.__dict__.get("check_inputs"),
        "marker": getattr(denoiser, "_attnctl_session", None),
    }


def test_no_control_equals_stock_and_restores(pipe, call_kwargs):
    before = _state(pipe)
    reference = pipe(PROMPTS, **call_kwargs()).images
    with apply(pipe):
        plain = pipe(PROMPTS, **call_kwargs()).images
    with apply(pipe, HookAll()):
        hooked = pipe(PROMPTS, **call_kwargs()).images
    after = pipe(PROMPTS, **call_kwargs()).images
    assert (plain - reference).abs().max() <= 1e-5
    assert (hooked - reference).abs().max() <= 1e-5
    assert torch.equal(after, reference)
    assert _state(pipe) == before


def test_restored_after_exception(pipe, call_kwargs):
    before = _state(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with apply(pipe, Boom()):
            pipe(PROMPTS, **call_kwargs())
    assert _state(pipe) == before
    with apply(pipe) as session:  # usable again
        pipe(PROMPTS, **call_kwargs())
    assert session.attention_calls > 0


def test_second_apply_on_shared_modules_is_an_error():
    pipe = tiny_pipeline("sd15")
    from diffusers import StableDiffusionImg2ImgPipeline

    other = StableDiffusionImg2ImgPipeline.from_pipe(pipe)  # shares the UNet
    with apply(pipe):
        with pytest.raises(ProcessorError, match="already active"):
            with apply(other):
                pass
    with apply(other):  # fine once the first one has left
        pass


def test_unknown_processor_is_left_installed():
    """A processor attnctl does not know is no longer refused at install: it stays installed and runs; only a
    control acting on a call attnctl cannot place is an error (tests/test_engine_v2.py)."""
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    pipe = tiny_pipeline("sd15")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    processor = AttnAddedKVProcessor()
    pipe.unet.get_submodule(name).set_processor(processor)
    before = _state(pipe)
    with apply(pipe):
        assert pipe.unet.get_submodule(name).processor is processor
    assert _state(pipe) == before


class Swap(Control):
    """Protocol kind 1 toy: add a bias that hides every text token but the first from cross-attention."""

    name = "swap"

    def bind(self, session):
        return {s.name: None for s in session.sites if s.has_text}

    def on_attention(self, call):
        bias = torch.zeros(call.k.shape[2], dtype=call.q.dtype)
        bias[call.text.start + 1 : call.text.stop] = float("-inf")
        call.add_bias(bias)


def test_attention_edit_changes_output_and_not_other_pipelines(family):
    pipe, bystander = tiny_pipeline(family), tiny_pipeline(family)
    kwargs = lambda: tiny_call_kwargs(family)  # noqa: E731
    reference = pipe(PROMPTS, **kwargs()).images
    with apply(pipe, Swap()):
        edited = pipe(PROMPTS, **kwargs()).images
        untouched = bystander(PROMPTS, **kwargs()).images
    assert (edited - reference).abs().max() > 1e-3
    assert torch.equal(untouched, reference)


class ToyGuide(Control):
    """Protocol kind 2 toy: a branch whose self-attention is the identity; guidance s (cond - toy)."""

    name = "toy-guide"

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def bind(self, session):
        return {s.name: None for s in session.sites if s.kind in ("self", "joint", "single")}

    def on_attention(self, call):
        rows = call.layout.rows("toy")
        if rows:
            u = torch.zeros(call.q.shape[0], call.q.shape[1])
            u[rows] = 1.0
            call.perturb(u)

    def branches(self, step):
        return ("toy",)

    def guidance(self, step, preds):
        return self.scale * (preds["cond"] - preds["toy"])


class IdentityEverywhere(ToyGuide):
    name = "identity"

    def on_attention(self, call):
        call.perturb(torch.ones(call.q.shape[0], call.q.shape[1]))

    def branches(self, step):
        return ()


def inside_a_pipeline_call(pipe, cfg, rescale, fn):
    """``fn()`` run inside a real 2-image pipeline call (from its first step's callback), where the call's CFG
    settings are live: the engine lays out a denoiser call from the pipeline call it is in (attnctl.layouts;
    outside one every row is cond)."""
    result = {}

    def callback(pipe, i, t, kwargs):
        if i == 0:
            result["out"] = fn()
        return {}

    pipe(PROMPTS[0], num_images_per_prompt=2, guidance_rescale=rescale, callback_on_step_end=callback,
         **tiny_call_kwargs("sd15", steps=1, guidance_scale=cfg))
    return result["out"]


@pytest.mark.parametrize("cfg, rescale", [(5.0, 0.0), (5.0, 0.7), (1.0, 0.0)])
def test_extra_branch_guidance_in_one_batch(cfg, rescale):
    pipe = tiny_pipeline("sd15")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    text = torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor(500)
    if cfg > 1:
        x, text = torch.cat([x, x]), torch.cat([torch.randn(2, 77, 32, generator=gen), text])
    plain = pipe.unet(x, t, encoder_hidden_states=text).sample

    def unet():
        return pipe.unet(x, t, encoder_hidden_states=text).sample

    with apply(pipe, IdentityEverywhere(0.0)):
        toy = inside_a_pipeline_call(pipe, cfg, rescale, unet)
    with apply(pipe, ToyGuide(2.0)):
        guided = inside_a_pipeline_call(pipe, cfg, rescale, unet)
    with apply(pipe, ToyGuide(0.0)):
        unchanged = inside_a_pipeline_call(pipe, cfg, rescale, unet)
    assert guided.shape == plain.shape
    cond = slice(2, 4) if cfg > 1 else slice(0, 2)
    expected = plain.clone()
    delta = 2.0 * (plain[cond] - toy[cond])
    # CFG weights sum to one: both rows of a sample take delta, with guidance_rescale too. (Until the rescale's
    # std was taken from the model's own cond rows by a stand-in for the pipeline's rescale_noise_cfg, rescale >
    # 0 kept the cond rows unshifted and put -delta / (w - 1) into the uncond rows: 3.7e-4 off diffusers' PAG at
    # w = 1.0001. tests/test_perturb.py checks what the rescale then computes.)
    expected[cond] = plain[cond] + delta
    if cfg > 1:
        expected[:2] = plain[:2] + delta
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
    if cfg > 1:  # what the pipeline's CFG makes of it: eps = uncond + w (cond - uncond) + 2 (cond - toy)
        eps = guided[:2] + cfg * (guided[2:] - guided[:2])
        reference = plain[:2] + cfg * (plain[2:] - plain[:2]) + 2.0 * (plain[2:] - toy[2:])
        torch.testing.assert_close(eps, reference, atol=1e-5, rtol=1e-5)
    # scale 0 still runs the extra rows: a larger batch blocks float32 matmuls differently (~1e-6)
    torch.testing.assert_close(unchanged, plain, atol=1e-5, rtol=0)


class Shift(Control):
    """Protocol kind 3 toy: a fixed latent change at the first step."""

    name = "shift"

    def __init__(self, delta):
        super().__init__()
        self.delta = delta

    def wants_latent_update(self, step):
        return step.index == 0

    def update_latents(self, update):
        return self.delta.expand_as(update.z)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_latent_update_reaches_the_pipeline_latents(family):
    pipe = tiny_pipeline(family)
    shape = (1, 4, 16, 16)
    delta = 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with apply(pipe, Shift(delta)):
        shifted = pipe("a red circle", **tiny_call_kwargs(family)).images
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sigma = float(pipe.scheduler.init_noise_sigma) if family != "sd3" else 1.0  # pipelines scale given latents
    reference = pipe("a red circle", latents=noise + delta / sigma, **tiny_call_kwargs(family)).images
    plain = pipe("a red circle", **tiny_call_kwargs(family)).images
    assert (shifted - reference).abs().max() <= 1e-4
    assert (shifted - plain).abs().max() > 1e-3


class Excite(Control):
    """Protocol kind 3 with gradients: one ascent step on the mean cross-attention to 'circle'."""

    name = "toy-excite"

    def bind(self, session):
        self.losses = []
        return {s.name: None for s in session.sites if s.kind == "cross"}

    def on_attention(self, call):
        if self.collect is not None:
            positions = call.text_positions(0, "circle")
            call.capture(positions, lambda p: self.collect.append(p[:, :, :, :].mean()))

    collect = None

    def wants_latent_update(self, step):
        return step.index == 0

    def _score(self, update, z):
        self.collect = []
        update.denoise(z)
        score, self.collect = torch.stack(self.collect).mean(), None
        return score

    def update_latents(self, update):
        z = update.z.clone().requires_grad_(True)
        score = self._score(update, z)
        (grad,) = torch.autograd.grad(score, z)
        delta = 5.0 * grad / grad.norm()
        with torch.no_grad():
            after = self._score(update, update.z + delta)
        self.losses.append((float(score.detach()), float(after)))
        return delta


def test_latent_update_with_gradients_through_attention():
    pipe = tiny_pipeline("sd15")
    control = Excite()
    with apply(pipe, control):
        pipe("a red circle", **tiny_call_kwargs("sd15"))
    (before, after), = control.losses
    assert after > before


class CopyText(Control):
    """Protocol kind 4 toy: sample 1's cond rows take sample 0's text keys and values."""

    name = "copy-text"

    def bind(self, session):
        return {s.name: None for s in session.sites if s.kind == "cross"}

    def on_attention(self, call):
        rows = call.layout.rows("cond")
        first = [r for r in rows if call.layout.samples[r] == 0][0]
        second = [r for r in rows if call.layout.samples[r] == 1][0]
        call.k = call.k.clone()
        call.v = call.v.clone()
        call.k[second] = call.k[first]
        call.v[second] = call.v[first]


def test_rows_of_one_batch_can_be_coupled():
    pipe = tiny_pipeline("sd15")
    kwargs = lambda: tiny_call_kwargs("sd15", guidance_scale=1.0)  # noqa: E731
    with apply(pipe, CopyText()):
        coupled = pipe(["a red circle", "a blue square"], **kwargs()).images
    same = pipe(["a red circle", "a red circle"], **kwargs()).images
    different = pipe(["a red circle", "a blue square"], **kwargs()).images
    assert (coupled[1] - same[1]).abs().max() <= 1e-5
    assert (coupled[1] - different[1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_img2img_pipelines(family):
    from diffusers import (FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline,
                           StableDiffusionImg2ImgPipeline)

    cls = {"sd15": StableDiffusionImg2ImgPipeline, "sd3": StableDiffusion3Img2ImgPipeline,
           "flux": FluxImg2ImgPipeline}[family]
    pipe = cls.from_pipe(tiny_pipeline(family))
    image = torch.rand(1, 3, 32, 32)
    kwargs = tiny_call_kwargs(family, steps=4, image=image, strength=0.5)
    kwargs.pop("height"), kwargs.pop("width")
    reference = pipe("a red circle", **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(0)
    with apply(pipe, HookAll()) as session:
        ours = pipe("a red circle", **kwargs).images
    assert (ours - reference).abs().max() <= 1e-5
    assert session.attention_calls > 0


def test_public_api():
    assert attnctl.apply is apply
    assert callable(attnctl.load)


class LateGuide(ToyGuide):
    """The toy branch, perturbing only the sites under ``prefix`` (e.g. the mid block)."""

    name = "late-guide"

    def __init__(self, scale, prefix):
        super().__init__(scale)
        self.prefix = prefix

    def bind(self, session):
        return {name: heads for name, heads in super().bind(session).items() if name.startswith(self.prefix)}


JOINS = {"sd15": ("mid_block", "down_blocks.1"), "sdxl": ("mid_block", "down_blocks.1"),
         "sd3": ("transformer_blocks.1", "transformer_blocks.0"),
         "flux": ("single_transformer_blocks.0", "transformer_blocks.0"),
         "qwenimage": ("transformer_blocks.1", "transformer_blocks.0")}


def _rows_per_block(session):
    """Batch rows each block of the denoiser receives, recorded by forward hooks: {block name: [rows, ...]}."""
    seen, handles = {}, []
    for name, module in session.adapter.blocks(session.denoiser):
        def record(module, args, kwargs, name=name):
            x = args[0] if args else next(iter(kwargs.values()))
            seen.setdefault(name, []).append(x.shape[0])
        handles.append(module.register_forward_pre_hook(record, with_kwargs=True))  # after the engine's
    return seen, handles


def test_extra_rows_join_at_the_first_hooked_block(family):
    """The extra branch's rows (copies of the cond rows) skip the blocks before the first one where a control
    acts: same result as running them through every block, fewer rows in the shared blocks."""
    pipe = tiny_pipeline(family)
    late, _ = JOINS[family]

    def kwargs():  # a fresh seeded generator per call
        extra = (dict(true_cfg_scale=4.0, negative_prompt="a blue square") if family in ("flux", "qwenimage")
                 else dict(guidance_scale=5.0))
        return dict(tiny_call_kwargs(family, output_type="latent"), prompt="a red circle", **extra)

    images, rows = {}, {}
    for share in (True, False):
        with apply(pipe, LateGuide(2.0, late), share_prefix=share) as session:
            seen, handles = _rows_per_block(session)
            try:
                images[share] = pipe(**kwargs()).images
            finally:
                for h in handles:
                    h.remove()
            rows[share] = seen
            record = session.last_run()
        assert record.get("extra_rows_from") == (late if share else None)
    torch.testing.assert_close(images[True], images[False], atol=1e-5, rtol=1e-5)
    with apply(pipe, LateGuide(0.0, late)):
        unguided = pipe(**kwargs()).images
    assert (images[True] - unguided).abs().max() > 1e-3  # the branch still guides
    blocks = list(rows[False])  # execution order, the tail module (norm_out) included
    join = blocks.index(late)
    assert rows[True][blocks[0]] and list(rows[True]) == blocks
    for name in blocks:  # CFG: [uncond, cond] + one extra row per image; FLUX: [cond] + 1, then [uncond]
        full = rows[False][name]
        expected = full if blocks.index(name) >= join else [r - 1 if r > 1 else r for r in full]
        assert rows[True][name] == expected, (name, rows[True][name], full)


def test_extra_rows_join_where_any_control_first_acts():
    """A second control hooking an earlier block moves the join there (its edits see the whole batch)."""
    pipe = tiny_pipeline("sd15")
    late, early = JOINS["sd15"]
    kwargs = dict(tiny_call_kwargs("sd15", output_type="latent"), prompt="a red circle", guidance_scale=5.0)
    maps = attnctl.controls.Maps(words=["circle"], layers=[f"{early}.**.attn2"])
    with apply(pipe, [LateGuide(2.0, late), maps]) as session:
        pipe(**kwargs)
    assert session.last_run()["extra_rows_from"] == early


def test_extra_rows_run_from_the_start_with_controlnet_residuals():
    """ControlNet residuals are added between blocks with the batch's original rows: no late join then."""
    from diffusers import ControlNetModel

    pipe = tiny_pipeline("sd15")
    controlnet = ControlNetModel.from_unet(pipe.unet).eval()
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 32, generator=gen)
    t = torch.tensor(500)
    down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=torch.rand(1, 3, 128, 128),
                           return_dict=False)
    results = {}
    for share in (True, False):
        with apply(pipe, LateGuide(2.0, "mid_block"), share_prefix=share) as session:
            results[share] = pipe.unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                                       mid_block_additional_residual=mid).sample
        assert session._joined_at is None
    torch.testing.assert_close(results[True], results[False], atol=0, rtol=0)


# -- a call that fails before denoising leaves nothing behind ----------------------------------------------------
def _prompt_controls(kind):
    from attnctl.controls.excite import Excite
    from attnctl.controls.maps import Maps
    from attnctl.controls.regions import Regions

    return {
        "maps": lambda: Maps(words=["circle", "red"]),
        "excite": lambda: Excite(subjects=["circle"], thresholds={}, scale_factor=200.0),
        "regions": lambda: Regions(regions=[{"phrase": "red circle", "box": [0.0, 0.0, 0.5, 1.0]}], mode="hard",
                                   window={"start": 0, "stop": 1}),
    }[kind]()


@pytest.mark.parametrize("kind", ["maps", "excite", "regions"])
def test_a_call_that_failed_before_denoising_leaves_no_stale_prompt(kind):
    """The first call encodes its prompt (token positions of "circle" at 9-10) and then fails on a bad argument
    (DDIM takes no custom ``timesteps``) before the denoising loop; the next call, with another prompt, must give
    what a fresh session gives: same latents, same maps, same diagnostics."""
    pipe = tiny_pipeline("sd15")
    stale, good = "a small blue square and a big red circle", "a red circle"
    with apply(pipe, _prompt_controls(kind)) as fresh:
        expected = pipe(good, **tiny_call_kwargs("sd15")).images
    expected_run = fresh.last_run()["controls"]
    control = _prompt_controls(kind)
    with apply(pipe, control) as session:
        with pytest.raises(ValueError, match="custom timestep"):
            pipe(stale, **tiny_call_kwargs("sd15", timesteps=[900, 500, 100]))
        ours = pipe(good, **tiny_call_kwargs("sd15")).images
    assert torch.equal(ours, expected), f"max abs difference {(ours - expected).abs().max().item():.3g}"
    assert session.prompts == [good]
    assert session.last_run()["controls"].keys() == expected_run.keys()
    if kind == "maps":
        fresh_maps = _prompt_controls("maps")
        with apply(pipe, fresh_maps):
            pipe(good, **tiny_call_kwargs("sd15"))
        for word in ("circle", "red"):
            torch.testing.assert_close(control.maps[word], fresh_maps.maps[word], atol=0, rtol=0)


# -- no silent fallbacks -----------------------------------------------------------------------------------------
def test_a_latent_update_that_cannot_reach_the_latents_is_an_error():
    """A pending latent update (2 samples) meets a ``scheduler.step`` whose sample has 1 row: the update used to
    be dropped silently; it is an error naming the argument and both batch sizes."""
    from attnctl.errors import AttnctlError

    pipe = tiny_pipeline("sd15")
    pipe.scheduler.set_timesteps(3)
    t = pipe.scheduler.timesteps[0]
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with apply(pipe, Shift(torch.full((1, 4, 16, 16), 0.1))):
        noise = pipe.unet(x, t, encoder_hidden_states=text).sample  # 2 cond rows: a pending update of 2 samples
        with pytest.raises(AttnctlError, match=r"scheduler\.step: sample has 1 rows.*latent update.*2 samples"):
            pipe.scheduler.step(noise[:1], t, x[:1])
        pipe.unet(x, t, encoder_hidden_states=text)
        with pytest.raises(AttnctlError, match=r"scheduler\.step: no `sample` argument.*latent update"):
            pipe.scheduler.step(noise, t)


class InPlaceDDIM:
    """Makes a DDIM scheduler refill one timesteps buffer on every ``set_timesteps`` (as a scheduler prepared
    for CUDA graphs would): the tensor object, hence its ``id``, is the same in every call."""

    @staticmethod
    def make(config):
        from diffusers import DDIMScheduler

        class Scheduler(DDIMScheduler):
            def set_timesteps(self, *args, **kwargs):
                buffer = getattr(self, "_buffer", None)
                super().set_timesteps(*args, **kwargs)
                if buffer is not None and buffer.shape == self.timesteps.shape:
                    buffer.copy_(self.timesteps)
                    self.timesteps = buffer
                self._buffer = self.timesteps

        return Scheduler.from_config(config)


class Clock(Control):
    name = "clock"

    def __init__(self):
        super().__init__()
        self.steps = []

    def bind(self, session):
        return {}

    def wants_latent_update(self, step):
        self.steps.append((step.index, step.timestep))
        return False


def test_the_step_clock_is_rebuilt_for_every_call():
    """Two calls with the same timesteps tensor object (same id, same length) but other values: the second
    call's steps are 0, 1, 2 at its own timesteps (a clock keyed on id(timesteps) kept the first call's)."""
    pipe = tiny_pipeline("sd15")
    pipe.scheduler = InPlaceDDIM.make(pipe.scheduler.config)
    clock = Clock()
    with apply(pipe, clock):
        pipe("a red circle", **tiny_call_kwargs("sd15"))
        first = pipe.scheduler.timesteps
        pipe.scheduler.register_to_config(timestep_spacing="trailing")
        clock.steps.clear()
        pipe("a red circle", **tiny_call_kwargs("sd15"))
    assert pipe.scheduler.timesteps is first  # the case under test: one tensor object for both calls
    assert clock.steps == [(i, float(t)) for i, t in enumerate(pipe.scheduler.timesteps)]


@pytest.mark.parametrize("late", [False, True], ids=["at-bind", "custom-control"])
def test_perturb_controls_that_disagree_on_mode_are_an_error(late):
    """Two perturbations at one site with different modes: the last control's mode used to win silently."""
    from attnctl.controls.perturb import Perturb
    from attnctl.errors import ControlError

    pipe = tiny_pipeline("sd3")
    site = "transformer_blocks.1.attn"
    if not late:
        controls = [Perturb(layers=[site], mode="full"), Perturb(layers=[site], mode="image", branch="other")]
        with pytest.raises(ControlError, match=r"mode = 'full' and mode = 'image' at transformer_blocks\.1\.attn"):
            with apply(pipe, controls):
                pass
        return

    class ImageMode(Control):  # a custom control perturbing the same rows in the other mode
        name = "image-mode"

        def bind(self, session):
            return {site: None}

        def on_attention(self, call):
            if call.layout.has("perturb"):
                call.perturb(torch.ones(call.q.shape[0], call.q.shape[1]), mode="image")

    message = r"transformer_blocks\.1\.attn: two controls .* perturb mode 'image' and 'full'"
    with pytest.raises(ControlError, match=message):
        with apply(pipe, [Perturb(layers=[site], mode="full"), ImageMode()]):
            pipe("a red circle", **tiny_call_kwargs("sd3", steps=1))
