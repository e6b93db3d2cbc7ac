"""Words and phrases of a prompt -> positions in the attention's text span.

A phrase is tokenized on its own and searched as a token subsequence of the prompt, so multi-token words work
and a phrase of several words is one subject. A repeated word matches every occurrence; ``"cat#2"`` picks the
second. Positions are offsets within the text span of an attention call (the adapter's ``TextSegment`` says
where each tokenizer's tokens start: SD3 puts CLIP tokens first and T5's after them, FLUX uses T5 only).
"""

from __future__ import annotations

import re

from .errors import TokenError

_OCCURRENCE = re.compile(r"^(.*)#(\d+)$")


def _ids(tokenizer, text: str, max_length: int | None, special: bool) -> list[int]:
    kwargs = dict(add_special_tokens=special)
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length)
    return list(tokenizer(text, **kwargs).input_ids)


def show_tokens(tokenizer, prompt: str, max_length: int | None = None) -> str:
    """The prompt's tokens with their positions, e.g. ``0:<|startoftext|> 1:a</w> 2:cat</w>``."""
    ids = _ids(tokenizer, prompt, max_length, special=True)
    return " ".join(f"{i}:{tok}" for i, tok in enumerate(tokenizer.convert_ids_to_tokens(ids)))


def find_phrase(tokenizer, prompt: str, phrase: str, max_length: int | None = None) -> list[int]:
    """Token positions of ``phrase`` in ``prompt`` (every occurrence, or the n-th with ``"phrase#n"``).

    Raises ``TokenError`` showing the prompt's tokenization when the phrase is not there.
    """
    occurrence = None
    match = _OCCURRENCE.match(phrase)
    if match:
        phrase, occurrence = match.group(1), int(match.group(2))
    phrase_ids = _ids(tokenizer, phrase.strip(), None, special=False)
    if not phrase.strip() or not phrase_ids:
        raise TokenError(f"empty phrase {phrase!r}: name a word of the prompt")
    prompt_ids = _ids(tokenizer, prompt, max_length, special=True)
    # Byte-level BPE (Qwen's, GPT-2's) spells a word after a space differently from the same word alone
    # ("Ġcat" vs "cat"): the phrase matches in either spelling.
    spellings = [phrase_ids]
    spaced = _ids(tokenizer, " " + phrase.strip(), None, special=False)
    if spaced != phrase_ids:
        spellings.append(spaced)
    found = {}
    for ids in spellings:
        n = len(ids)
        for i in range(len(prompt_ids) - n + 1):
            if prompt_ids[i : i + n] == ids:
                found.setdefault(i, n)
    starts = sorted(found)
    if not starts:
        raise TokenError(
            f"{phrase!r} is not in the prompt {prompt!r}. The prompt tokenizes as: "
            f"{show_tokens(tokenizer, prompt, max_length)}; the phrase as: "
            f"{' '.join(tokenizer.convert_ids_to_tokens(phrase_ids))}"
        )
    if occurrence is not None:
        if not 1 <= occurrence <= len(starts):
            raise TokenError(
                f"{phrase!r} occurs {len(starts)} time(s) in {prompt!r}; #{occurrence} does not exist"
            )
        starts = [starts[occurrence - 1]]
    return [s + j for s in starts for j in range(found[s])]
