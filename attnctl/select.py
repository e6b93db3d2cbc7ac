"""Exact layer and head selectors.

A selector names attention modules by their dotted path, segment by segment, never by substring or regex, so
``transformer_blocks.1`` selects block 1 only (diffusers' regex ``blocks.1`` also matches blocks 10-19, its
issue #13594). Grammar::

    selector  := [path] (":" option)*        e.g.  transformer_blocks.7:heads=0,3,5
    path      := segment ("." segment)*             down_blocks.2.*.attn1
    segment   := name | integer | a-b | * | **      single_transformer_blocks.10-15
    option    := heads=LIST | kind=KIND[,KIND]      kind=self   (a selector may be options only)
    LIST      := integer or a-b, comma-separated    heads=0-3,7

A path selects every attention module at or below it (``mid_block`` selects all of the mid block's attention).
``*`` matches exactly one segment, ``**`` any number (``**.attn1``), ``a-b`` an inclusive integer range.
A selector that matches nothing is an error listing close matches; a head index out of range is an error.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .adapters.base import KINDS, Site
from .errors import SelectorError

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^\d+$")


def _parse_ints(text: str, what: str, selector: str) -> tuple[int, ...]:
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = _RANGE.match(part)
        if match:
            low, high = int(match.group(1)), int(match.group(2))
            if high < low:
                raise SelectorError(f"selector {selector!r}: {what} range {part!r} is empty (write low-high)")
            values.extend(range(low, high + 1))
        elif part.isdigit():
            values.append(int(part))
        else:
            raise SelectorError(
                f"selector {selector!r}: {what} must be integers or ranges like 0,3,5 or 2-4, got {part!r}"
            )
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class Selector:
    """A parsed selector. ``heads=None`` means all heads; ``kinds=None`` means any kind."""

    text: str
    path: tuple[str, ...]
    heads: tuple[int, ...] | None = None
    kinds: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> Selector:
        if not isinstance(text, str) or not text.strip():
            raise SelectorError(f"a selector must be a non-empty string, got {text!r}")
        text = text.strip()
        parts = text.split(":")
        path_text, options = parts[0], parts[1:]
        if "=" in path_text:  # options only, e.g. "kind=self"
            options.insert(0, path_text)
            path_text = ""
        path = tuple(path_text.split(".")) if path_text else ()
        for segment in path:
            if segment in ("*", "**") or _RANGE.match(segment) or _NAME.match(segment):
                continue
            raise SelectorError(
                f"selector {text!r}: bad path segment {segment!r}; use names, integers, ranges like 10-15, * or **"
                " (no regex)"
            )
        heads = kinds = None
        for option in options:
            key, _, value = option.partition("=")
            key = key.strip()
            if key == "heads":
                heads = _parse_ints(value, "heads", text)
            elif key == "kind":
                kinds = tuple(k.strip() for k in value.split(","))
                bad = [k for k in kinds if k not in KINDS]
                if bad:
                    raise SelectorError(f"selector {text!r}: unknown kind {bad[0]!r}; allowed: {', '.join(KINDS)}")
            else:
                raise SelectorError(f"selector {text!r}: unknown option {key!r}; allowed: heads=..., kind=...")
        return cls(text=text, path=path, heads=heads, kinds=kinds)

    def matches(self, name: str, kind: str) -> bool:
        if self.kinds is not None and kind not in self.kinds:
            return False
        return _match(self.path, tuple(name.split(".")))


def _segment_matches(pattern: str, segment: str) -> bool:
    if pattern == "*":
        return True
    match = _RANGE.match(pattern)
    if match:
        return segment.isdigit() and int(match.group(1)) <= int(segment) <= int(match.group(2))
    return pattern == segment


def _match(pattern: tuple[str, ...], name: tuple[str, ...]) -> bool:
    """True when ``pattern`` matches a prefix of ``name`` segment by segment (``**`` spans any number)."""
    if not pattern:
        return True
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, name[i:]) for i in range(len(name) + 1))
    if not name or not _segment_matches(head, name[0]):
        return False
    return _match(rest, name[1:])


def _close_matches(selector: Selector, sites: Sequence[Site]) -> str:
    candidates: set[str] = set()
    for site in sites:
        segments = site.name.split(".")
        for i in range(1, len(segments) + 1):
            candidates.add(".".join(segments[:i]))
    wanted = ".".join(selector.path)
    close = difflib.get_close_matches(wanted, sorted(candidates), n=4, cutoff=0.5)
    if close:
        return " Close matches: " + ", ".join(close) + "."
    return " Run `attnctl layers MODEL` to list the layers."


def select(
    sites: Sequence[Site], selectors: str | Iterable[str] | None, *, kinds: Iterable[str] | None = None
) -> dict[str, tuple[int, ...] | None]:
    """Resolve selectors against ``sites``: ``{site name: heads or None (all heads)}``.

    Several selectors union (head sets merge; "all heads" wins). ``selectors=None`` selects every site;
    ``kinds`` further restricts to sites of those kinds (a control that only makes sense on, say, self-attention).
    Raises ``SelectorError`` when a selector matches nothing or names a head that does not exist.
    """
    allowed = set(kinds) if kinds is not None else None
    if selectors is None:
        selectors = ["**"]
    if isinstance(selectors, str):
        selectors = [selectors]
    selectors = list(selectors)
    if not selectors:
        raise SelectorError("the selection is empty: give at least one layer selector")
    chosen: dict[str, tuple[int, ...] | None] = {}
    for text in selectors:
        selector = text if isinstance(text, Selector) else Selector.parse(text)
        hits = [s for s in sites if selector.matches(s.name, s.kind) and (allowed is None or s.kind in allowed)]
        if not hits:
            only = f" among {'/'.join(sorted(allowed))} layers" if allowed is not None else ""
            raise SelectorError(f"selector {selector.text!r} matches no attention layer{only}." +
                                _close_matches(selector, sites))
        for site in hits:
            if selector.heads is not None:
                bad = [h for h in selector.heads if h >= site.heads]
                if bad:
                    raise SelectorError(
                        f"selector {selector.text!r}: head {bad[0]} does not exist in {site.name}, which has "
                        f"{site.heads} heads (0-{site.heads - 1})"
                    )
            previous = chosen.get(site.name, ())
            if previous is None or selector.heads is None:
                chosen[site.name] = None
            else:
                chosen[site.name] = tuple(sorted(set(previous) | set(selector.heads)))
    return chosen
