"""Map capture reads the word's own token column on every family, at non-square sizes."""

import inspect

import torch
from PIL import Image

from attnctl.controls.maps import Maps
from attnctl.engine import apply
from attnctl.heatmap import overlay


# Where each family's attention call puts the text keys, written here from diffusers' processors (not from
# attnctl's layouts, which are what is under test): UNets attend image queries to text keys only (cross
# attention); SD3's joint attention concatenates [image, text] tokens, FLUX's [text, image].
LAYER = {"sd15": "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
         "sdxl": "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
         "sd3": "transformer_blocks.0.attn", "flux": "transformer_blocks.0.attn",
         "qwenimage": "transformer_blocks.0.attn"}
PROMPT = "a red circle"


def _record_attention(pipe, family, kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the stock pipeline (no attnctl) and return the (query, key) tensors, (batch, heads, tokens, dim),
    that diffusers' own processor of ``LAYER[family]`` passes to scaled_dot_product_attention, one per call."""
    denoiser = pipe.unet if family in ("sd15", "sdxl") else pipe.transformer
    module = denoiser.get_submodule(LAYER[family])
    inner, seen = module.processor, []

    def recording(*args, **kw):
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def spy(*a, **k):
            seen.append(((a[0] if a else k["query"]).detach().clone(),
                         (a[1] if len(a) > 1 else k["key"]).detach().clone()))
            assert k.get("attn_mask") is None and k.get("scale") is None  # plain softmax(q k^T / sqrt(d)) below
            return sdpa(*a, **k)

        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            return inner(*args, **kw)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa

    class Recording:  # Attention.forward drops the kwargs its processor's signature does not name: name them all
        def __call__(self, *args, **kw):
            return recording(*args, **kw)

    Recording.__call__.__signature__ = inspect.signature(type(inner).__call__)
    module.set_processor(Recording())
    try:
        pipe(PROMPT, **kwargs)
    finally:
        module.set_processor(inner)
    return seen


def _token_position(pipe, family, word: str) -> int:
    """``word``'s index among the text keys, read from the tokenizer that feeds them (CLIP; FLUX's T5)."""
    tokenizer = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer
    if family == "qwenimage":  # byte-level BPE: a word inside the prompt carries its space ("Ġcircle")
        word = " " + word
    (token,) = tokenizer.encode(word, add_special_tokens=False)
    return tokenizer(PROMPT).input_ids.index(token)


def _explicit_map(query, key, family, n_image: int, position: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of the conditional (last) row, image queries -> text key ``position``, averaged
    over heads: (n_image,)."""
    probs = torch.softmax(query[-1] @ key[-1].transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1).mean(dim=0)
    n_text = key.shape[2] - (n_image if family in ("sd3", "flux", "qwenimage") else 0)
    image_rows = slice(n_text, None) if family in ("flux", "qwenimage") else slice(0, n_image)
    text_offset = {"sd3": n_image, "flux": 0}.get(family, 0)
    return probs[image_rows, text_offset + position]


def test_map_is_the_softmax_column_of_the_words_token(pipe, family, call_kwargs):
    """The captured map of a word is the attention of the image queries to that word's own token, on random
    weights: it equals an explicit recomputation at the word's tokenizer position, and the neighbouring
    positions (another word, the end token) do not match, so a map read at a wrong position fails here."""
    kwargs = lambda: call_kwargs(steps=1, height=32, width=48)  # noqa: E731 (a fresh generator per call)
    ((query, key),) = _record_attention(pipe, family, kwargs())
    control = Maps(words=["circle", "red circle"], layers=[LAYER[family]])
    with apply(pipe, control) as session:
        pipe(PROMPT, **kwargs())
    h, w = session.last_run()["controls"]["maps"]["grid"]
    assert h * 3 == w * 2  # 32x48 pixels keep their aspect ratio on every grid
    captured = control.maps["circle"]
    assert captured.shape == (1, h, w)
    at = _token_position(pipe, family, "circle")
    expected = _explicit_map(query, key, family, h * w, at).reshape(1, h, w)
    torch.testing.assert_close(captured, expected)
    assert expected.std() > 1e-4  # a spatially varying map: a transposed or shifted reading would not match
    for wrong in (at - 1, at + 1):  # 'red' and the end token
        neighbour = _explicit_map(query, key, family, h * w, wrong).reshape(1, h, w)
        assert (captured - neighbour).abs().max() > 100 * (captured - expected).abs().max() + 1e-5
    red = _explicit_map(query, key, family, h * w, _token_position(pipe, family, "red")).reshape(1, h, w)
    torch.testing.assert_close(control.maps["red circle"], expected + red)  # a phrase: its tokens' sum


def test_maps_differ_by_word_and_overlay_draws(pipe, family, call_kwargs):
    control = Maps(words=["red", "circle"], layers=None)
    with apply(pipe, control):
        pipe("a red circle", **call_kwargs())
    assert not torch.allclose(control.maps["red"], control.maps["circle"])
    picture = overlay(Image.new("RGB", (32, 32), "white"), control.maps["red"][0])
    assert picture.size == (32, 32) and picture.getextrema() != ((255, 255),) * 3
