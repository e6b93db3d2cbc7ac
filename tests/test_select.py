import pytest

from attnctl.adapters.base import Site
from attnctl.engine import Session
from attnctl.errors import SelectorError
from attnctl.select import Selector, select

BLOCKS = [Site(f"transformer_blocks.{i}.attn", "joint", 4, 8, i) for i in range(20)] + [
    Site(f"single_transformer_blocks.{i}.attn", "single", 4, 8, 20 + i) for i in range(16)]


def test_no_prefix_surprise():
    chosen = select(BLOCKS, "transformer_blocks.1")
    assert list(chosen) == ["transformer_blocks.1.attn"]  # not 10-19 (diffusers #13594)


def test_ranges_wildcards_kinds_and_heads():
    assert list(select(BLOCKS, "single_transformer_blocks.10-15")) == [
        f"single_transformer_blocks.{i}.attn" for i in range(10, 16)]
    assert len(select(BLOCKS, "*.3.attn")) == 2
    assert len(select(BLOCKS, "kind=single")) == 16
    assert len(select(BLOCKS, "**.attn:kind=joint")) == 20
    assert select(BLOCKS, "transformer_blocks.7:heads=0,3") == {"transformer_blocks.7.attn": (0, 3)}
    merged = select(BLOCKS, ["transformer_blocks.7:heads=0", "transformer_blocks.7:heads=2-3"])
    assert merged == {"transformer_blocks.7.attn": (0, 2, 3)}
    assert select(BLOCKS, ["transformer_blocks.7:heads=0", "transformer_blocks.7"]) == {
        "transformer_blocks.7.attn": None}


@pytest.mark.parametrize("text, message", [
    ("transformer_block.1", "Close matches: transformer_blocks"),
    ("transformer_blocks.99", "matches no attention layer"),
    ("transformer_blocks.1:heads=4", "head 4 does not exist"),
    ("transformer_blocks.[12]", "bad path segment"),
    ("kind=cros", "unknown kind"),
    ("transformer_blocks.1:head=1", "unknown option"),
    ("transformer_blocks.5-2", "matches no attention layer"),
    ("transformer_blocks.1:heads=a", "must be integers"),
    ("", "non-empty"),
])
def test_bad_selectors(text, message):
    with pytest.raises(SelectorError, match=message):
        select(BLOCKS, text)


def test_empty_selection_is_an_error():
    with pytest.raises(SelectorError, match="empty"):
        select(BLOCKS, [])


def test_every_family_selects_its_own_layers(pipe, family):
    session = Session(pipe)
    sites = session.sites
    names = [s.name for s in sites]
    for name in names:  # a full name selects exactly itself
        assert list(select(sites, name)) == [name]
    expected_kinds = {"sd15": {"self", "cross"}, "sdxl": {"self", "cross"}, "sd3": {"joint", "self"},
                      "flux": {"joint", "single"}, "qwenimage": {"joint"}}[family]
    assert {s.kind for s in sites} == expected_kinds
    first_block = ".".join(names[0].split(".")[:2])
    assert all(n.startswith(first_block + ".") for n in select(sites, first_block))
    assert Selector.parse("down_blocks.2.*.attn1").path == ("down_blocks", "2", "*", "attn1")
