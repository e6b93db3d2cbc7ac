"""Tokenizers built offline from a word list.

No hub is reachable, so the tiny test pipelines and the embedded ShapesWorld models carry tokenizers we build
ourselves. ``build_clip_tokenizer`` makes a byte-level BPE whose merges spell every listed word as one
whole-word token (``"circle</w>"``), while any other text still tokenizes through the 256 byte symbols.
``build_t5_tokenizer`` makes a unigram (sentencepiece-style) tokenizer with the words as ``"▁word"`` pieces.
``build_qwen_tokenizer`` makes the byte-level BPE of the Qwen language models (FLUX.2 [klein], Qwen-Image and
Z-Image encode prompts with one) with each word one token, bare and after a space (``"cat"``, ``"Ġcat"``).
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


QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_table() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _byte_level(text: str) -> str:
    table = _byte_table()
    return "".join(table[b] for b in text.encode("utf-8"))


def _whole_word_bpe(words: Iterable[str], spaced_first: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE in which each of ``words``, bare or after a space, is one token:
    the 256 byte symbols, then each word's merges (the spaced form's first with ``spaced_first``, which orders the
    token ids), then merges joining whatever pieces an earlier merge left split. No special tokens."""
    from tokenizers.models import BPE

    vocab: dict[str, int] = {}
    for symbol in sorted(set(_byte_table().values())):
        vocab.setdefault(symbol, len(vocab))
    targets = []
    for word in dict.fromkeys(words):
        bare, spaced = _byte_level(word), _byte_level(" " + word)
        targets += [spaced, bare] if spaced_first else [bare, spaced]
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(pieces) -> None:
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in seen:
                seen.add((current, piece))
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))

    for target in targets:
        add(list(target))
    # An early merge of one word can split another (as for CLIP above): join whatever pieces are left, lowest
    # priority, until every target is one token.
    for _ in range(8):
        model = BPE(vocab=dict(vocab), merges=list(merges), dropout=None, unk_token=None, continuing_subword_prefix="",
                    end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
        broken = {t: [p.value for p in model.tokenize(t)] for t in targets}
        broken = {t: pieces for t, pieces in broken.items() if len(pieces) != 1}
        if not broken:
            return vocab, merges
        for pieces in broken.values():
            add(pieces)
    raise ValueError(f"cannot build whole-word tokens for {sorted(broken)}")


def build_qwen_tokenizer(words: Iterable[str] = DEFAULT_WORDS, *, chat_template: str | None = None,
                         model_max_length: int = 512, spaced_first: bool = True, eos_token: str = QWEN_SPECIAL[0],
                         list_chat_tokens: bool = True):
    """A byte-level BPE ``Qwen2Tokenizer`` in which each of ``words``, bare or after a space, is one token.

    Vocabulary: the 256 byte symbols, each word's merges, then ``<|endoftext|>`` (unknown and padding token),
    ``<|im_start|>`` and ``<|im_end|>``; every other text still tokenizes through the byte symbols. What the
    families' tiny pipelines differ in (each keeps its own, so their random weights and outputs stay as they were):

    - ``chat_template``: the Jinja template ``apply_chat_template`` renders (each family's pipeline calls it);
    - ``spaced_first``: the order of each word's merges, and so of the token ids: ``"Ġcat"``'s before ``"cat"``'s
      (FLUX.2) or after (Qwen-Image, Z-Image);
    - ``eos_token``: FLUX.2 ends on ``<|im_end|>``, the others on ``<|endoftext|>``;
    - ``list_chat_tokens``: ``<|im_start|>``/``<|im_end|>`` listed among the special tokens (``all_special_ids``,
      FLUX.2) or only added as special tokens that are matched whole (Qwen-Image, Z-Image).
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _whole_word_bpe(words, spaced_first)
    for token in QWEN_SPECIAL:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, eos_token=eos_token,
                               unk_token=QWEN_SPECIAL[0], pad_token=QWEN_SPECIAL[0])
    if list_chat_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL[1:])})
    else:
        tokenizer.add_tokens([AddedToken(t, special=True) for t in QWEN_SPECIAL[1:]])
    tokenizer.chat_template = chat_template
    return tokenizer


# The pre-tokenizer split of Qwen2's tokenizer (a word takes the space or punctuation mark before it).
_WORD_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")

# Mistral's control tokens, in the order of their ids in Mistral's Tekken tokenizers (there with unused ones between
# them): unknown, begin and end of text, the user turn, the image placeholders (Pixtral), padding, the system turn.
MISTRAL_SPECIAL = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")


def build_mistral_tokenizer(words: Iterable[str] = DEFAULT_WORDS, *, chat_template: str | None = None,
                            model_max_length: int = 512):
    """A byte-level BPE tokenizer like Mistral's Tekken ones (Mistral Small 3.x, FLUX.2 [dev]'s text encoder): the
    control tokens of ``MISTRAL_SPECIAL`` first (ids 0, 1, ...), then the 256 byte symbols and merges that make each
    of ``words``, bare or after a space, one token (``"cat"``, ``"Ġcat"``); the same pre-tokenizer as Qwen's (a
    word takes the space before it). ``<s>`` is the begin token (the chat template writes it; plain tokenization
    puts it in front of a text, as Mistral's tokenizers do), ``</s>`` the end token, ``<pad>`` the padding,
    right-padded. Returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    byte_vocab, merges = _whole_word_bpe(words, spaced_first=True)
    vocab = {token: i for i, token in enumerate(MISTRAL_SPECIAL)}
    for token in byte_vocab:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token="<unk>", continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_WORD_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", model_max_length=model_max_length,
                                        padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL_SPECIAL[3:6] + MISTRAL_SPECIAL[7:])})
    tokenizer.chat_template = chat_template
    return tokenizer
