"""Token alignment between an edit's source and target prompts (Prompt-to-Prompt's word swap and refinement).

``align_prompts(segments, source, target, kind, length)`` returns an ``Alignment`` over a text span of ``length``
tokens: ``matrix`` (length, length) with ``matrix[i, j]`` = the weight of source token i in target token j's
map, and ``own`` (length,) = 1 where target token j keeps its own map (a word the source does not have).
A target map is then ``P_src @ matrix + P_tgt * own`` (P: attention probabilities over the text tokens).

- ``swap`` (and ``reweight``): the prompts have the same number of words and word k replaces word k. Equal token
  counts map one to one; a word of n source tokens and m target tokens gives each target token the mean of the
  source word's maps (P2P's replacement mapper does the same for unequal token counts).
- ``refine``: the longest common subsequence of the two token sequences is mapped one to one; target tokens
  outside it (added words) keep their own maps.
Special tokens before the prompt map to themselves; the end token and padding map from the end of the source
prompt, so the padding that follows both prompts stays aligned. Positions that no tokenizer covers (SD3
without T5: zero embeddings) map to themselves.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from .errors import ControlError

KINDS = ("swap", "refine", "reweight")


@dataclass(frozen=True)
class Alignment:
    matrix: torch.Tensor  # (length, length) float64
    own: torch.Tensor  # (length,) float64

    @property
    def identity(self) -> bool:
        eye = torch.eye(self.matrix.shape[0], dtype=self.matrix.dtype)
        return bool(torch.equal(self.matrix, eye)) and not bool(self.own.any())


def _plain(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def _prefix_length(tokenizer, prompt: str) -> int:
    """How many special tokens the tokenizer puts before the prompt (CLIP: 1, T5: 0)."""
    full = list(tokenizer(prompt, add_special_tokens=True).input_ids)
    plain = _plain(tokenizer, prompt)
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return i
    return 0


def _word_spans(tokenizer, words: list[str]) -> list[tuple[int, int]]:
    """Token span [a, b) of each word within the plain tokenization of ``" ".join(words)``."""
    spans, previous = [], 0
    for k in range(1, len(words) + 1):
        end = len(_plain(tokenizer, " ".join(words[:k])))
        spans.append((previous, end))
        previous = end
    return spans


def _lcs_pairs(a: list[int], b: list[int]) -> list[tuple[int, int]]:
    """Index pairs (i, j) of a longest common subsequence of ``a`` and ``b``."""
    n, m = len(a), len(b)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            table[i][j] = table[i + 1][j + 1] + 1 if a[i] == b[j] else max(table[i + 1][j], table[i][j + 1])
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if a[i] == b[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def check_swappable(source: str, target: str, kind: str) -> None:
    """A word swap needs as many words in the target as in the source; the error names the words that differ."""
    ws, wt = source.split(), target.split()
    if len(ws) == len(wt):
        return
    matcher = difflib.SequenceMatcher(a=ws, b=wt, autojunk=False)
    extra = [w for tag, _, _, j0, j1 in matcher.get_opcodes() if tag in ("insert", "replace") for w in wt[j0:j1]]
    missing = [w for tag, i0, i1, _, _ in matcher.get_opcodes() if tag in ("delete", "replace") for w in ws[i0:i1]]
    raise ControlError(
        f"edit kind {kind!r} swaps words one for one, but the source {source!r} has {len(ws)} words and the target "
        f"{target!r} has {len(wt)} (only in the target: {', '.join(map(repr, extra)) or 'none'}; only in the "
        f"source: {', '.join(map(repr, missing)) or 'none'}). Use kind 'refine' to add words, or make the "
        "prompts the same length."
    )


def _segment(tokenizer, source: str, target: str, kind: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment within one tokenizer's block of ``size`` positions."""
    matrix = torch.zeros(size, size, dtype=torch.float64)
    own = torch.zeros(size, dtype=torch.float64)
    prefix = _prefix_length(tokenizer, source)
    plain_s, plain_t = _plain(tokenizer, source), _plain(tokenizer, target)
    end_s, end_t = prefix + len(plain_s), prefix + len(plain_t)
    pairs: list[tuple[int, int, float]] = [(p, p, 1.0) for p in range(prefix)]
    if kind == "refine":
        pairs += [(prefix + i, prefix + j, 1.0) for i, j in _lcs_pairs(plain_s, plain_t)]
        mapped = {j for _, j, _ in pairs}
        for j in range(prefix, end_t):
            if j not in mapped:
                own[min(j, size - 1)] = 1.0
    else:
        ws, wt = source.split(), target.split()
        for (a_s, b_s), (a_t, b_t) in zip(_word_spans(tokenizer, ws), _word_spans(tokenizer, wt)):
            n_s, n_t = b_s - a_s, b_t - a_t
            for j in range(n_t):
                if n_s == n_t:
                    pairs.append((prefix + a_s + j, prefix + a_t + j, 1.0))
                else:
                    pairs += [(prefix + a_s + i, prefix + a_t + j, 1.0 / max(n_s, 1)) for i in range(n_s)]
    pairs += [(j - end_t + end_s, j, 1.0) for j in range(end_t, size) if 0 <= j - end_t + end_s < size]
    for i, j, w in pairs:
        if i < size and j < size:
            matrix[i, j] += w
    return matrix, own


def align_prompts(segments, source: str, target: str, kind: str, length: int) -> Alignment:
    """The alignment over a text span of ``length`` tokens made of ``segments`` (adapters' ``TextSegment``)."""
    if kind not in KINDS:
        raise ControlError(f"unknown edit kind {kind!r}; allowed: {', '.join(KINDS)}")
    if kind != "refine":
        check_swappable(source, target, kind)
    matrix = torch.eye(length, dtype=torch.float64)
    own = torch.zeros(length, dtype=torch.float64)
    for segment in segments:
        start = segment.offset
        if start >= length:
            continue
        size = min(segment.max_length or length - start, length - start)
        block, block_own = _segment(segment.tokenizer, source, target, kind, size)
        matrix[start : start + size, :] = 0
        matrix[:, start : start + size] = 0
        matrix[start : start + size, start : start + size] = block
        own[start : start + size] = block_own
    return Alignment(matrix, own)
