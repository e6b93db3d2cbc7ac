"""What all our processors share: a site, the session, and the processor they replaced."""

from __future__ import annotations


class AttnctlProcessor:
    """Base of the per-family processors. ``_attnctl`` marks them so a second ``apply`` is detected."""

    _attnctl = True

    def __init__(self, site, session, original):
        self.site = site
        self.session = session
        self.original = original

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.site.name})"


def split_heads(attn, query, key, value, norm_q, norm_k):
    """(B, S, heads * D) projections -> (B, heads, S, D) each, then the q/k norms (either may be None)."""
    batch_size, head_dim = query.shape[0], key.shape[-1] // attn.heads
    query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value
