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
