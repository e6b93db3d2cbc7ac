"""Tokenizers built offline from a word list.

No hub is reachable, so the tiny test pipelines and the embedded ShapesWorld models carry tokenizers we build
ourselves. ``build_clip_tokenizer`` makes a byte-level BPE whose merges spell every listed word as one
whole-word token (``"circle</w>"``), while any other text still tokenizes through the 256 byte symbols.
``build_t5_tokenizer`` makes a unigram (sentencepiece-style) tokenizer with the words as ``"▁word"`` pieces.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers.pre_tokenizers import ByteLevel

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# Words every tiny pipeline knows: enough for prompts in tests and docs.
DEFAULT_WORDS = (
    "a an the and of on in with to left right top bottom small large big tiny middle center corner "
    "red green blue yellow purple orange white black pink gray brown "
    "circle square triangle star cat dog bird car tree house crown bow apple ball boat photo painting"
).split()


def _clip_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
    for symbol in alphabet:
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        word = word.lower()
        if len(word) < 2:
            continue
        # Merge left to right: ("c","i") -> "ci", ("ci","r") -> "cir", ... ("circl","e</w>") -> "circle</w>".
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            pair = (current, part)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            current = current + part
            vocab.setdefault(current, len(vocab))
    vocab.setdefault(CLIP_BOS, len(vocab))
    vocab.setdefault(CLIP_EOS, len(vocab))
    return vocab, merges


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77):
    """A ``CLIPTokenizer`` in which each of ``words`` is a single whole-word token.

    Returns the tokenizer; ``len(tokenizer)`` is the vocabulary size a text encoder needs.
    """
    from transformers import CLIPTokenizer

    words = [w.lower() for w in words]
    vocab, merges = _clip_merges(words)
    # An early merge from one word can split another ("top" merges "t"+"o" before "bottom" can form "bot"+"t"):
    # append merges that join whatever pieces are left, lowest priority, until every word is one token.
    for _ in range(8):
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
        broken = {w: tokenizer.tokenize(w) for w in words if len(w) > 1}
        broken = {w: p for w, p in broken.items() if p != [w + "</w>"]}
        if not broken:
            return tokenizer
        for pieces in broken.values():
            current = pieces[0]
            for piece in pieces[1:]:
                if (current, piece) not in merges:
                    merges.append((current, piece))
                current = current + piece
                vocab.setdefault(current, len(vocab))
    raise ValueError(f"cannot build whole-word tokens for {sorted(broken)}: {broken}")


def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 512):
    """A ``T5Tokenizer`` (unigram) with ``"▁word"`` pieces for ``words`` and single characters as fallback."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    known = {p for p, _ in pieces}
    for word in words:
        piece = "\u2581" + word.lower()
        if piece not in known:
            known.add(piece)
            pieces.append((piece, -1.0))
    for ch in "\u2581abcdefghijklmnopqrstuvwxyz0123456789,.-'":
        if ch not in known:
            known.add(ch)
            pieces.append((ch, -8.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
