"""FLUX.2 ([klein] base on ``tiny:flux2``, [dev] on ``tiny:flux2-dev``, [klein] KV): the adapter, stock equality,
every control, PAG parity, bad input.

Real components only: diffusers' ``Flux2KleinPipeline`` with tiny random weights (its processors, its CFG call,
its reference-image conditioning), ``Flux2Pipeline`` ([dev]: a Mistral3 text encoder, its system message and
chat template, guidance-distilled) and ``Flux2KleinKVPipeline`` (KV-cache processors) with the same transformer
and VAE, and, for parity, diffusers' modular FLUX.2 [klein] base pipeline with its ``PerturbedAttentionGuidance``
guider. The tests every FLUX.2 pipeline must pass run on [klein] and [dev]
(``each``); the ones about [klein]'s CFG call, its modular pipeline, masks and inversion on [klein] only.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from recording import assert_only_head_perturbed

import attnctl
from attnctl.controls.base import Control
from attnctl.controls.edit import Edit
from attnctl.controls.maps import Maps
from attnctl.controls.perturb import Perturb
from attnctl.controls.regions import Regions
from attnctl.engine import apply
from attnctl.errors import AttnctlError, ControlError, ModelError
from attnctl.testing import tiny_call_kwargs, tiny_pipeline

from excite_checks import check_excite_raises_the_weakest_subject

PROMPT = "a red circle and a blue square"
JOINT = "transformer_blocks.0.attn"
SINGLE = "single_transformer_blocks.0.attn"


PIPELINES = ("flux2", "flux2-dev")


@pytest.fixture(scope="module")
def built():
    """Each tiny pipeline, built once for the module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny_pipeline(name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def pipe(built):  # FLUX.2 [klein] base
    return built("flux2")


@pytest.fixture(params=PIPELINES)
def each(request, built):
    """(name, pipeline): FLUX.2 [klein] base and FLUX.2 [dev]."""
    return request.param, built(request.param)


def kwargs(name="flux2", **overrides):
    return tiny_call_kwargs(name, **overrides)


def calls_per_step(name):  # [klein] base: CFG's uncond call after the cond call; [dev]: guidance-distilled
    return 2 if name == "flux2" else 1


def reference_image(seed=0, size=64):  # FLUX.2 takes references of at least 64 px
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class Probe(Control):
    """Records each call at the named sites (q, k, v, bias, spans, layout) and its per-head output."""

    name = "probe"

    def __init__(self, sites):
        super().__init__()
        self.sites, self.calls = set(sites), []

    def bind(self, session):
        return {name: None for name in self.sites}

    def on_attention(self, call):
        record = {"site": call.site.name, "q": call.q, "k": call.k, "v": call.v, "bias": call.bias,
                  "text": call.text, "image": call.image, "layout": call.layout, "grid": call.grid}
        self.calls.append(record)

        def keep(out):
            record["out"] = out
            return out

        call.then(keep)


# -- the adapter ---------------------------------------------------------------------------------------------
def test_sites_kinds_and_reference_token_spans(each):
    name, pipe = each
    session = attnctl.engine.Session(pipe)
    assert session.family == "flux2"
    assert [(s.name, s.kind, s.heads, s.head_dim) for s in session.sites] == [
        (JOINT, "joint", 4, 8), (SINGLE, "single", 4, 8), ("single_transformer_blocks.1.attn", "single", 4, 8)]
    probe = Probe([JOINT, SINGLE])
    with apply(pipe, probe):
        pipe(prompt=PROMPT, image=[reference_image()], **kwargs(name, steps=1))
    n_text = kwargs(name)["max_sequence_length"]
    assert len(probe.calls) == 2 * calls_per_step(name)
    for record in probe.calls:
        # [text (32 / 48); generated image (8 x 8); reference image (16 x 16)]: the image span is the generated
        # image only
        assert record["text"] == slice(0, n_text)
        assert record["image"] == slice(n_text, n_text + 64)
        assert record["q"].shape[2] == n_text + 64 + 256
        assert record["grid"] == (8, 8)


# -- with no control, stock diffusers -----------------------------------------------------------------------
@pytest.mark.parametrize("reference", [False, True])
def test_no_control_equals_stock_bit_for_bit_and_hooks_within_1e5(each, reference):
    """No control: torch.equal (CFG's second call, reference images). A control at every site that changes
    nothing routes every call through attnctl's attention: within 1e-5 of stock."""
    name, pipe = each
    extra = {"image": [reference_image()]} if reference else {}
    stock = pipe(prompt=PROMPT, **kwargs(name), **extra).images
    with apply(pipe, []):
        ours = pipe(prompt=PROMPT, **kwargs(name), **extra).images
    assert torch.equal(stock, ours)
    session = attnctl.engine.Session(pipe)
    with apply(pipe, Probe([s.name for s in session.sites])) as run:
        hooked = pipe(prompt=PROMPT, **kwargs(name), **extra).images
    torch.testing.assert_close(hooked, stock, atol=1e-5, rtol=0)
    assert run.attention_calls == 3 * 3 * calls_per_step(name)  # 3 sites x 3 steps x (cond [+ uncond] call)


# -- perturb ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", [JOINT, SINGLE])
def test_perturbing_a_head_changes_only_that_head(each, site):
    name, pipe = each
    probe = Probe([site])
    with apply(pipe, [Perturb(scale=1.0, layers=f"{site}:heads=1"), probe]):
        guided = pipe(prompt=PROMPT, image=[reference_image()], **kwargs(name, steps=2)).images
    plain = pipe(prompt=PROMPT, image=[reference_image()], **kwargs(name, steps=2)).images
    assert (guided - plain).abs().max() > 1e-4  # PAG's guidance moved the image
    perturbed_calls = [r for r in probe.calls if r["layout"].has("perturb")]
    assert perturbed_calls
    for record in perturbed_calls:
        assert_only_head_perturbed(record, 1)
        layout, out = record["layout"], record["out"]
        cond, perturbed = out[layout.rows("cond")], out[layout.rows("perturb")]
        text = record["text"]  # image mode: text queries keep their plain attention
        torch.testing.assert_close(perturbed[:, :, text], cond[:, :, text], atol=0, rtol=0)


def test_image_mode_identity_covers_reference_tokens_float64(each):
    """mode=image at a joint site with a reference image: text queries attend to everything, every other token
    (generated and reference) to the text and itself; checked against an explicit float64 masked softmax."""
    name, pipe = each
    probe = Probe([JOINT])
    with apply(pipe, [Perturb(scale=1.0, layers=[JOINT], mode="image"), probe]):
        pipe(prompt=PROMPT, image=[reference_image()], **kwargs(name, steps=1))
    record = next(r for r in probe.calls if r["layout"].has("perturb"))
    rows = record["layout"].rows("perturb")
    q, k, v = (record[n][rows].double() for n in ("q", "k", "v"))
    seq, n_text = q.shape[2], record["text"].stop
    allowed = torch.zeros(seq, seq, dtype=torch.bool)
    allowed[:n_text] = True
    allowed[:, :n_text] = True
    allowed |= torch.eye(seq, dtype=torch.bool)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(record["out"][rows].double(), expected, atol=2e-5, rtol=1e-4)


# -- PAG parity with diffusers' modular guider ----------------------------------------------------------------
def _modular_pag(pipe, layers, scale, guidance, monkeypatch):
    """The modular FLUX.2 [klein] base pipeline on the same components, with diffusers' PAG guider."""
    from diffusers.guiders import PerturbedAttentionGuidance
    from diffusers.hooks._helpers import AttentionProcessorMetadata, AttentionProcessorRegistry
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor
    from diffusers.modular_pipelines import Flux2KleinBaseAutoBlocks

    # diffusers 0.42.1's layer-skip hook looks the processor up in a registry that lacks FLUX.2's processors, even
    # though the attention-score skip it applies never calls the registered function: register them as unused.
    def unused(*args, **kwargs):
        raise AssertionError("skip_attention_scores never calls the processor-output function")

    # And the hook asks every attention module ``is_cross_attention``, which FLUX.2's modules do not define.
    for module in pipe.transformer.modules():
        if type(module).__name__ in ("Flux2Attention", "Flux2ParallelSelfAttention"):
            monkeypatch.setattr(module, "is_cross_attention", False, raising=False)
    AttentionProcessorRegistry._register()
    for cls in (Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor):
        if cls not in AttentionProcessorRegistry._registry:
            AttentionProcessorRegistry.register(cls, AttentionProcessorMetadata(skip_processor_output_fn=unused))
    modular = Flux2KleinBaseAutoBlocks().init_pipeline()
    guider = PerturbedAttentionGuidance(guidance_scale=guidance, perturbed_guidance_scale=scale,
                                        perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
                                        perturbed_guidance_config={"indices": layers[1], "fqn": layers[0]})
    modular.update_components(**{k: v for k, v in pipe.components.items()}, guider=guider)
    return modular


@pytest.mark.parametrize("fqn, index", [("transformer_blocks", 0), ("single_transformer_blocks", 1)])
def test_layer_pag_matches_diffusers_modular_guider(pipe, fqn, index, monkeypatch):
    """diffusers' guider makes the attention of every module in the block return its values V: at a joint site
    the whole [text; image] map becomes the identity, attnctl's mode='full' (mode='image', attnctl's default,
    keeps text rows and image->text columns: checked against float64 above). Its window counts steps strictly
    after int(start * steps), so step 0 never has PAG: attnctl's window starts after step 0 too.

    float32, 3 steps, CFG 4, PAG scale 2. The modular pipeline encodes the prompt and the empty negative prompt
    in another batch composition than Flux2KleinPipeline, which alone moves its final latents by up to 2.1e-4
    (same seed, no PAG, measured); so the outputs agree to 5e-4 and the change PAG makes (about 0.05) to 5e-4.
    """
    site = f"{fqn}.{index}.attn"
    call = dict(prompt=PROMPT, num_inference_steps=3, height=32, width=32, max_sequence_length=32,
                output="latents")
    theirs = {scale: pipe._unpatchify_latents(
        _modular_pag(pipe, (fqn, [index]), scale=scale, guidance=4.0, monkeypatch=monkeypatch)(
            **call, generator=torch.Generator().manual_seed(0)))
        for scale in (0.0, 2.0)}
    probe = Probe([site])
    control = Perturb(scale=2.0, layers=[site], mode="full", window={"start": 0.3, "stop": 1.0})
    with apply(pipe, [control, probe]) as session:
        ours = pipe(prompt=PROMPT, **kwargs(guidance_scale=4.0)).images
    assert session.last_run()["controls"]["perturb"]["steps"] == [1, 2]
    plain = pipe(prompt=PROMPT, **kwargs(guidance_scale=4.0)).images
    for record in probe.calls:  # the perturbed rows' attention output is V itself, every token
        rows = record["layout"].rows("perturb")
        torch.testing.assert_close(record["out"][rows], record["v"][rows], atol=0, rtol=0)
    assert ((ours - plain) - (theirs[2.0] - theirs[0.0])).abs().max() < 5e-4
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs[2.0], atol=5e-4, rtol=0)


def _unpack(pipe, theirs, like):
    """The modular pipeline's latents (2x2-patchified channels) -> the standard pipeline's unpatchified ones."""
    theirs = pipe._unpatchify_latents(theirs)
    assert theirs.shape == like.shape
    return theirs


# -- regions, excite, maps, edit -------------------------------------------------------------------------------
RED, BLUE = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


def test_hard_regions_confine_each_phrase_to_its_box_with_a_reference_image(each):
    name, pipe = each
    regions = Regions(regions=[{"phrase": "red circle", "box": list(RED)}, {"phrase": "blue square", "box": list(BLUE)}],
                      mode="hard", window={"start": 0, "stop": 1})
    probe = Probe([JOINT, SINGLE])
    with apply(pipe, [regions, probe]) as session:
        pipe(prompt=PROMPT, image=[reference_image()], **kwargs(name, steps=1))
        positions = {p: session.text_positions(0, p) for p in ("red circle", "blue square")}
    assert all(len(p) == 2 for p in positions.values())
    assert probe.calls
    for record in probe.calls:
        cond = record["layout"].rows("cond")
        if not cond or record["bias"] is None:
            continue
        q, k = record["q"][cond].double(), record["k"][cond].double()
        bias = record["bias"].double().expand(len(cond), -1, -1, -1) if record["bias"].shape[0] == 1 else \
            record["bias"][cond].double()
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias, dim=-1)
        image = record["image"]
        h, w = record["grid"]
        columns = torch.arange(w).repeat(h)
        for phrase, left in (("red circle", True), ("blue square", False)):
            inside = (columns < w // 2) if left else (columns >= w // 2)
            cols = positions[phrase]
            to_phrase = probs[:, :, image][..., cols]  # generated-image queries -> phrase keys
            assert bool((to_phrase[:, :, ~inside] == 0).all()) and bool((to_phrase[:, :, inside] > 0).all())
            from_phrase = probs[:, :, cols][..., image]  # phrase queries -> generated-image keys
            assert bool((from_phrase[..., ~inside] == 0).all())
            # reference tokens are not in any region: their queries still see the phrase
            assert bool((probs[:, :, image.stop:][..., cols] > 0).all())


def _mask_file(tmp_path, name, width, height, left_half=True):
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, : width // 2] = 255
    path = tmp_path / name
    Image.fromarray(pixels, mode="L").save(path)
    return str(path)


@pytest.mark.parametrize("size, like", [((96, 32), "side by side"), ((32, 96), "stacked"), ((50, 20), None)])
def test_a_mask_that_would_cover_reference_tokens_is_an_error_naming_it(pipe, tmp_path, size, like):
    """Generated image 8x8 tokens, reference 16x16: a mask at the joined canvas' aspect ratio (24x8 side by side,
    8x24 stacked) or any other one not the generated image's is refused at the first call with the reference."""
    path = _mask_file(tmp_path, "joined.png", *size)
    regions = Regions(regions=[{"phrase": "red circle", "mask": path}], mode="hard", window={"start": 0, "stop": 1})
    with apply(pipe, regions):
        with pytest.raises(ControlError) as info:
            pipe(prompt=PROMPT, image=[reference_image()], **kwargs(steps=1))
    message = str(info.value)
    assert f"regions.0.mask = {path!r}" in message and f"{size[0]}x{size[1]}" in message
    assert "1 reference image(s) (token grids 16x16" in message and "generated image only" in message
    assert (f"the generated image and its references {like}" in message) if like else "aspect ratio of" not in message


def test_a_mask_at_the_generated_images_ratio_places_on_it_with_a_reference(pipe, tmp_path):
    """The default: a square mask (the generated image's ratio) is the generated image's left half, exactly the
    box [0, 0, 0.5, 1]; the reference's tokens stay outside every region."""
    biases = []
    for region in ({"mask": _mask_file(tmp_path, "left.png", 64, 64)}, {"box": list(RED)}):
        regions = Regions(regions=[{"phrase": "red circle", **region}], mode="hard", window={"start": 0, "stop": 1})
        probe = Probe([JOINT])
        with apply(pipe, [regions, probe]):
            pipe(prompt=PROMPT, image=[reference_image()], **kwargs(steps=1))
        biases.append([r["bias"] for r in probe.calls if r["bias"] is not None])
    assert biases[0] and len(biases[0]) == len(biases[1])
    for by_mask, by_box in zip(*biases):
        assert torch.equal(by_mask, by_box)
        image = probe.calls[0]["image"]
        assert bool((by_mask[..., image.stop:, :] == 0).all()) and bool((by_mask[..., image.stop:] == 0).all())


def test_reference_grids_of_a_call(pipe):
    seen = []

    class Grids(Control):
        name = "grids"

        def bind(self, session):
            return {JOINT: None}

        def on_attention(self, call):
            seen.append(call.session.adapter.reference_grids(call.frame.params))

    with apply(pipe, Grids()):
        pipe(prompt=PROMPT, image=[reference_image(), reference_image(1, size=96)], **kwargs(steps=1))
        pipe(prompt=PROMPT, **kwargs(steps=1))
    assert seen[0] == [(16, 16), (24, 24)] and seen[-1] == []


def test_excite_raises_the_weakest_subject(each):
    """The weakest subject's max image->text attention (A&E's loss is 1 minus it), after iterative refinement
    at step 0 and an update at step 1, against the same run with a negligible step size."""
    name, pipe = each
    check_excite_raises_the_weakest_subject(pipe, PROMPT, SINGLE, lambda: kwargs(name, steps=3))


def test_maps_are_the_image_queries_softmax_column(each):
    name, pipe = each
    maps = Maps(words=["circle"], layers=[SINGLE])
    probe = Probe([SINGLE])
    with apply(pipe, [maps, probe]) as session:
        pipe(prompt=PROMPT, image=[reference_image()], **kwargs(name, steps=1))
        at = session.text_positions(0, "circle")
    assert len(at) == 1
    cond = [r for r in probe.calls if r["layout"].has("cond")]
    record = cond[-1]
    rows = record["layout"].rows("cond")
    q, k = record["q"][rows].double(), record["k"][rows].double()
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, H, S, S)
    assert torch.allclose(probs.sum(-1), torch.ones((), dtype=torch.float64))
    expected = probs[:, :, record["image"], at[0]].mean(dim=1).reshape(1, 8, 8)
    torch.testing.assert_close(maps.maps["circle"].double(), expected, atol=1e-5, rtol=1e-4)


def test_edit_word_swap_runs_on_joint_attention(each):
    name, pipe = each
    edit = Edit()
    with apply(pipe, edit):
        out = pipe(prompt=["a red circle", "a blue circle"], **kwargs(name, steps=2)).images
    plain = pipe(prompt=["a red circle", "a blue circle"], **kwargs(name, steps=2)).images
    assert (out[1] - plain[1]).abs().max() > 1e-4  # the target follows the source's attention
    torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=0)


# -- bad input -------------------------------------------------------------------------------------------------
def test_selector_naming_a_block_flux2_lacks(pipe):
    with pytest.raises(AttnctlError, match="transformer_blocks.3"):
        with apply(pipe, Perturb(layers=["transformer_blocks.3.attn"])):
            pass


def test_editing_a_real_image_runs_end_to_end(pipe):
    """``edit`` of a real image: inverted through the adapter's encoding (patchify, batch-norm statistics, the
    pipeline's (B, 4C, h/2, w/2) ``latents=``), then source and target generated from it under the edit control,
    CFG 4 with the negative-prompt fix ([klein] takes no ``negative_prompt``: it gets ``negative_prompt_embeds``).
    The source row is the plain regeneration of the inverted image."""
    from attnctl.editing import edit
    from attnctl.inversion import regenerate

    result = edit(pipe, "a red circle", "a blue circle", image=reference_image(size=32), steps=3,
                  guidance_scale=4.0, height=32, width=32, max_sequence_length=32)
    assert result.inversion.latents.shape == (1, 16, 8, 8)
    source, target = np.asarray(result.source, dtype=int), np.asarray(result.target, dtype=int)
    assert source.shape == target.shape == (32, 32, 3) and np.abs(target - source).max() > 0
    plain = regenerate(pipe, result.inversion, ["a red circle", "a blue circle"], output_type="pil").images
    assert np.abs(source - np.asarray(plain[0], dtype=int)).max() <= 1
    assert result.inversion.generate_kwargs(["a red circle", "a blue circle"])["negative_prompt_embeds"].shape[0] == 2


def test_a_tokenizer_without_chat_template_is_a_clear_error(pipe):
    class Processor:  # neither a tokenizer nor a processor with a chat template: no way to place the prompt
        pass

    adapter = attnctl.engine.Session(pipe).adapter
    fake = type("Flux2Pipeline", (), {"tokenizer": Processor()})()
    with pytest.raises(ModelError, match="word-level controls"):
        adapter.text_segments(fake)


def test_interpolate_anchors_are_plain_and_frames_move_between_them(each):
    from interpolation_checks import check_interpolation

    name, pipe = each
    check_interpolation(pipe, name)


# -- words inside the chat templates ([klein]: Qwen3's user turn; [dev]: Mistral's system message and user turn) --
def _text_encoder_ids(pipe, prompt, **call):
    """The input ids the pipeline gives its text encoder for ``prompt`` (its own template and tokenization)."""
    seen = []
    forward = pipe.text_encoder.forward

    def record(*args, **kwargs):
        seen.append(kwargs["input_ids"])
        return forward(*args, **kwargs)

    pipe.text_encoder.forward = record
    try:
        pipe.encode_prompt(prompt=prompt, device="cpu", max_sequence_length=call["max_sequence_length"])
    finally:
        del pipe.text_encoder.forward
    return seen[0][0].tolist()


@pytest.mark.parametrize("phrase, tokens", [("circle", ["Ġcircle"]), ("blue square", ["Ġblue", "Ġsquare"]),
                                            ("a#2", ["Ġa"]), ("a", ["a", "Ġa"])])
def test_word_positions_index_the_text_encoders_own_input_ids(each, phrase, tokens):
    """The positions attnctl finds are where the phrase's tokens are in the ids the text encoder gets (so in the
    text span of every attention call): after [klein]'s ``<|im_start|>user\n`` (6 tokens), after [dev]'s begin
    token, system message (30 tokens with its [SYSTEM_PROMPT] tags) and [INST]."""
    name, pipe = each
    ids = _text_encoder_ids(pipe, PROMPT, **kwargs(name))
    with apply(pipe, Maps(words=["circle"], layers=[SINGLE])) as session:
        pipe(prompt=PROMPT, **kwargs(name, steps=1))
        positions = session.text_positions(0, phrase)
    tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)
    assert tokenizer.convert_ids_to_tokens([ids[p] for p in positions]) == tokens
    first = {"flux2": 6, "flux2-dev": 31}[name]  # the prompt's first token ("a")
    assert session.text_positions(0, "a#1") == [first]


def test_dev_with_a_processor_places_words_as_with_its_tokenizer(built):
    """FLUX.2 [dev] ships a PixtralProcessor; transformers' ``ProcessorMixin.apply_chat_template`` (which it
    inherits) tokenizes the rendered template without adding special tokens when it starts with the begin token.
    A text-only processor on the same tokenizer: the same image (torch.equal) and the same word positions."""
    from transformers import ProcessorMixin

    class TextProcessor(ProcessorMixin):  # PixtralProcessor without the image half (which needs torchvision)
        def __init__(self, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(tokenizer, chat_template=chat_template)

        def __call__(self, text=None, images=None, **kwargs):
            return self.tokenizer(text, **kwargs)

    pipe = built("flux2-dev")
    tokenizer = pipe.tokenizer
    plain = pipe(prompt=PROMPT, **kwargs("flux2-dev", steps=1)).images
    with apply(pipe, Maps(words=["circle"], layers=[SINGLE])) as session:
        pipe(prompt=PROMPT, **kwargs("flux2-dev", steps=1))
        expected = {p: session.text_positions(0, p) for p in ("circle", "blue square")}
    pipe.tokenizer = TextProcessor(tokenizer, chat_template=tokenizer.chat_template)
    try:
        assert torch.equal(pipe(prompt=PROMPT, **kwargs("flux2-dev", steps=1)).images, plain)
        with apply(pipe, Maps(words=["circle"], layers=[SINGLE])) as session:
            pipe(prompt=PROMPT, **kwargs("flux2-dev", steps=1))
            assert {p: session.text_positions(0, p) for p in expected} == expected
    finally:
        pipe.tokenizer = tokenizer


def test_left_padding_is_a_clear_error(each):
    name, pipe = each
    adapter = attnctl.engine.Session(pipe).adapter
    tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)
    tokenizer.padding_side = "left"
    try:
        with pytest.raises(ModelError, match="pads on the left.*only with right padding"):
            adapter.text_segments(pipe)
    finally:
        tokenizer.padding_side = "right"


def test_mistral_tokenizer_words_are_one_token_after_the_begin_token():
    from attnctl.testing_flux2 import MISTRAL_CHAT_TEMPLATE, mistral_tokenizer

    tokenizer = mistral_tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer("a red circle, You").input_ids) == [
        "<s>", "a", "Ġred", "Ġcircle", ",", "ĠYou"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("[INST]cat[/INST]", add_special_tokens=False).input_ids) == [
        "[INST]", "cat", "[/INST]"]
    assert (tokenizer.padding_side, tokenizer.pad_token, tokenizer.chat_template) == ("right", "<pad>",
                                                                                       MISTRAL_CHAT_TEMPLATE)
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "[INST]"]) == [0, 1, 2, 3]


# -- FLUX.2 [klein] KV (Flux2KleinKVPipeline): KV-cache processors ------------------------------------------------
@pytest.fixture(scope="module")
def kv():
    from attnctl.testing_flux2 import flux2_klein_kv

    return flux2_klein_kv()


def kv_kwargs(**overrides):  # distilled: no guidance_scale, one call per step
    call = kwargs(**overrides)
    call.pop("guidance_scale")
    return call


def test_kv_pipeline_uses_its_kv_processors_and_no_control_equals_stock(kv):
    processors = {type(m.processor).__name__ for m in kv.transformer.modules() if hasattr(m, "processor")}
    assert processors == {"Flux2KVAttnProcessor", "Flux2KVParallelSelfAttnProcessor"}
    for extra in ({}, {"image": [reference_image()]}):  # with a reference: the extract step, then cached steps
        stock = kv(prompt=PROMPT, **kv_kwargs(), **extra).images
        with apply(kv, []):
            assert torch.equal(kv(prompt=PROMPT, **kv_kwargs(), **extra).images, stock)


@pytest.mark.parametrize("site", [JOINT, SINGLE])
def test_kv_pipeline_pag_changes_only_the_chosen_head_and_the_output(kv, site):
    """Without reference images the KV processors make the standard attention call: head PAG works as on
    [klein], and maps' word columns are found."""
    probe = Probe([site])
    maps = Maps(words=["circle"], layers=[site])
    with apply(kv, [Perturb(scale=1.0, layers=f"{site}:heads=1"), probe, maps]):
        guided = kv(prompt=PROMPT, **kv_kwargs(steps=2)).images
    plain = kv(prompt=PROMPT, **kv_kwargs(steps=2)).images
    assert (guided - plain).abs().max() > 1e-4
    records = [r for r in probe.calls if r["layout"].has("perturb")]
    assert len(records) == 2 and maps.maps["circle"].shape == (1, 8, 8)
    for record in records:
        assert_only_head_perturbed(record, 1)


def test_kv_pipeline_with_references_under_a_control_is_refused_naming_it(kv):
    """With reference images the first step attends twice and later steps attend to cached reference keys: refused
    at the first denoiser call, before it runs, naming the pipeline; the advice it gives (Flux2KleinPipeline on the
    same components) runs the control with the references."""
    from diffusers import Flux2KleinPipeline

    from recording import Recorder

    with Recorder(kv) as recorder, apply(kv, Perturb(scale=1.0, layers=[SINGLE])):
        with pytest.raises(ModelError, match=r"^Flux2KleinKVPipeline with reference images \(image=...\) cannot "
                                             r"run under attnctl's controls: .*kv_cache_mode='extract'"):
            kv(prompt=PROMPT, image=[reference_image()], **kv_kwargs())
    assert recorder.calls == []  # the denoiser never ran
    plain = Flux2KleinPipeline(**kv.components)
    plain.set_progress_bar_config(disable=True)
    with apply(plain, Perturb(scale=1.0, layers=[SINGLE])):
        guided = plain(prompt=PROMPT, image=[reference_image()], **kv_kwargs(steps=2)).images
    assert (guided - plain(prompt=PROMPT, image=[reference_image()], **kv_kwargs(steps=2)).images).abs().max() > 1e-4
