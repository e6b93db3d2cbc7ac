"""One error hierarchy for everything attnctl raises on purpose.

The CLI and the app print ``str(error)`` (never a traceback unless ``--debug``), so every message says what was
wrong, where, what is allowed, and, where we can guess it, what the user probably meant.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AttnctlError(Exception):
    """Base class of every error attnctl raises deliberately."""


class RecipeError(AttnctlError):
    """A recipe (YAML file, dict or ``--set`` override) is malformed or holds a bad value."""


class SelectorError(AttnctlError):
    """A layer/head selector is malformed or matches nothing."""


class ModelError(AttnctlError):
    """A model string cannot be loaded, or the loaded pipeline is not of a supported family."""


class ControlError(AttnctlError):
    """A control got options it cannot use (bad value, unknown word, unsupported family)."""


class ProcessorError(AttnctlError):
    """Attention cannot be controlled: a second ``apply`` on the same modules, or a processor whose attention call
    attnctl cannot place (none it can intercept, more than declared, or options the controls cannot honour)."""


class LayoutError(AttnctlError):
    """A denoiser call whose rows attnctl cannot assign to uncond/cond/extra branches from what the call is
    (the message names the denoiser, its row count and the layout that was expected): never a silent guess."""


class TokenError(ControlError):
    """A word or phrase cannot be found among the prompt's tokens."""


def did_you_mean(value: str, choices: Iterable[str], n: int = 3) -> str:
    """A ``" (did you mean 'x'?)"`` suffix, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
