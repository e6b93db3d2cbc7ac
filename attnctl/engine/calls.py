"""The attention call object: one attention computation inside a hooked module, as controls see and edit it.

``attnctl.intercept`` catches a processor's attention primitive call and asks the session for an
``AttentionCall`` (``Session.attention_call``); every control hooked at the site edits it in turn
(``on_attention``), then ``compute`` runs the edited attention on the session's backend. What the call knows
about its batch (``layout``) and step (``step``) comes from the engine's current ``Frame``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..adapters.base import Site
from ..attention import AttentionRequest, attend, key_probabilities
from ..errors import ControlError
from ..layouts import BatchLayout
from .clock import StepInfo
from .rows import Frame

if TYPE_CHECKING:
    from .session import Session


class AttentionCall:
    """One attention computation, described for controls. q/k/v: (B, H, S, D).

    ``text``: the text tokens' span in the key sequence (None for self-attention); ``image``: the image tokens'
    span in the query sequence; ``grid``: (h, w) of the image tokens. Controls edit the call through
    ``add_bias``, ``perturb``, ``capture``, ``then`` or by replacing ``q``/``k``/``v``; ``heads`` holds the
    heads the current control selected at this site (None = all).
    """

    def __init__(self, session: Session, site: Site, q, k, v, text: slice | None, image: slice, bias=None):
        self.session = session
        self.site = site
        self.frame: Frame = session.frame
        self.q, self.k, self.v = q, k, v
        self.text = text
        self.image = image
        self.bias = bias
        self.u: torch.Tensor | None = None
        self.mode = "full"
        self.heads: tuple[int, ...] | None = None
        self._captures: list[tuple[torch.Tensor, Any]] = []
        self._then: list[Any] = []
        self._taken: tuple[list[int], Any] | None = None

    @property
    def layout(self) -> BatchLayout:
        return self.frame.layout

    @property
    def step(self) -> StepInfo:
        return self.frame.step

    @property
    def grid(self) -> tuple[int, int]:
        n_image = self.image.stop - self.image.start
        return self.session.adapter.image_grid(self.frame.latent_hw, n_image)

    def text_positions(self, sample: int, phrase: str) -> list[int]:
        """Positions of ``phrase`` of this sample's prompt in the key sequence (offset by the text span)."""
        if self.text is None:
            raise ControlError(f"{self.site.name} is self-attention: it has no text tokens")
        return [self.text.start + p for p in self.session.text_positions(sample, phrase)]

    def add_bias(self, bias: torch.Tensor) -> None:
        """Add to the pre-softmax scores; ``bias`` broadcasts to (B, H, Sq, Sk) (a (Sk,) bias is per key).
        A boolean bias (or an existing boolean attention mask) means True = may attend, i.e. 0 / -inf."""
        while bias.ndim < 4:
            bias = bias.unsqueeze(0)
        bias = self._additive(bias)
        self.bias = bias if self.bias is None else self._additive(self.bias) + bias

    def _additive(self, bias: torch.Tensor) -> torch.Tensor:
        if bias.dtype == torch.bool:
            return torch.zeros(bias.shape, dtype=self.q.dtype, device=bias.device).masked_fill(~bias, float("-inf"))
        return bias.to(self.q.dtype)

    def perturb(self, u: torch.Tensor, mode: str = "full") -> None:
        """Move each (row, head) map towards identity by ``u`` (B, H) in [0, 1]. Strengths from several controls
        combine by maximum; they must agree on ``mode`` (one attention computation has one mode)."""
        if self.u is not None and mode != self.mode:
            raise ControlError(f"{self.site.name}: two controls perturb this attention layer, with perturb mode "
                               f"{mode!r} and {self.mode!r}; one layer takes one mode (allowed: 'full' or 'image'), "
                               "so give the controls the same mode or disjoint layers")
        self.u = u if self.u is None else torch.maximum(self.u, u)
        self.mode = mode

    def capture(self, positions: list[int], fn) -> None:
        """After attention, call ``fn(probs)`` with probabilities (B, H, Sq, len(positions)) for those keys."""
        self._captures.append((torch.as_tensor(positions, dtype=torch.long), fn))

    def then(self, fn) -> None:
        """Call ``fn(out) -> out`` on the attention output (B, H, Sq, D)."""
        self._then.append(fn)

    def take_rows(self, rows: list[int], fn) -> None:
        """Let ``fn(q, k, v) -> out`` compute the plain attention of batch rows ``rows`` (their q/k/v as edited,
        (n, H, S, D)) in place of the backend, e.g. to share its work with an extra attention of the same keys.
        Honoured only where nothing else changes those rows' attention (no bias, no perturbation on them, no
        capture) and one control asks; otherwise the backend computes every row and ``fn`` is not called."""
        self._taken = (list(rows), fn) if self._taken is None else ([], None)

    def _compute_taken(self) -> torch.Tensor | None:
        rows, fn = self._taken if self._taken is not None else ([], None)
        if fn is None or not rows or self.bias is not None or self._captures:
            return None
        if self.u is not None and bool((self.u[rows] != 0).any()):
            return None
        others = [r for r in range(self.q.shape[0]) if r not in set(rows)]
        taken = fn(self.q[rows], self.k[rows], self.v[rows])
        if not others:
            return taken
        rest = attend(AttentionRequest(self.q[others], self.k[others], self.v[others],
                                       u=self.u[others] if self.u is not None else None, mode=self.mode,
                                       text=self.text), backend=self.session.backend)
        out = rest.new_empty(self.q.shape[:3] + rest.shape[3:])
        out[rows], out[others] = taken.to(rest.dtype), rest
        return out

    def compute(self) -> torch.Tensor:
        for positions, fn in self._captures:
            fn(key_probabilities(self.q, self.k, positions, bias=self.bias))
        out = self._compute_taken()
        if out is None:
            out = attend(AttentionRequest(self.q, self.k, self.v, bias=self.bias, u=self.u, mode=self.mode,
                                          text=self.text), backend=self.session.backend)
        for fn in self._then:
            out = fn(out)
        return out


__all__ = ["AttentionCall"]
