"""Install and undo: every change ``apply`` makes to a pipeline, recorded so that exit puts it back exactly.

The engine changes objects only through an ``Undo`` log: ``set_attr`` sets an attribute on an instance and
records how to restore it (the previous instance attribute, or none, so the class attribute shows again);
``wrap_forward`` wraps a module's forward, under an accelerate hook where there is one (model CPU offload);
``push`` records any other undo step (a hook handle's ``remove``, a released patch). ``undo_all`` runs them in
reverse order and keeps going when one fails. ``dressed_as`` builds the wrappers the engine installs on
methods a pipeline inspects before calling (``scheduler.step``, ``check_inputs``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

_MISSING = object()


class Undo:
    """A log of changes to undo, last first."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], object]] = []

    def set_attr(self, obj, name: str, value) -> None:
        """``setattr(obj, name, value)``, undone by restoring the instance attribute it replaced (or removing it,
        so a class attribute of that name shows again)."""
        previous = obj.__dict__.get(name, _MISSING)
        setattr(obj, name, value)

        def undo():
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, previous)

        self._steps.append(undo)

    def wrap_forward(self, module, build: Callable[[Callable], Callable]) -> Callable:
        """Put ``build(forward)`` in place of ``module``'s forward; returns the forward it wraps.

        A module carrying an accelerate hook (``enable_model_cpu_offload``, ``cpu_offload``, a device map: its
        ``forward`` calls ``module._old_forward``) is wrapped *under* the hook, as ``_old_forward``: the hook
        keeps moving weights around attnctl's wrapper, and diffusers' re-offload at the end of every pipeline
        call (``maybe_free_model_hooks`` removes and re-adds the hooks) carries the wrapper over instead of
        dropping it. Undo takes the wrapper out wherever it is then (``forward`` or ``_old_forward``: a hook
        added inside the block wraps it from outside), so the hook stays and calls the module's own forward.
        """
        target = "_old_forward" if "_old_forward" in module.__dict__ and hasattr(module, "_hf_hook") else "forward"
        previous = module.__dict__.get(target, _MISSING)
        original = getattr(module, target)
        wrapper = build(original)
        setattr(module, target, wrapper)

        def undo():
            for attr in ("forward", "_old_forward"):
                if module.__dict__.get(attr) is wrapper:
                    if attr == "forward" and previous is _MISSING and target == "forward":
                        del module.__dict__[attr]  # the class's forward shows again
                    else:
                        setattr(module, attr, original)

        self._steps.append(undo)
        return original

    def push(self, step: Callable[[], object]) -> None:
        self._steps.append(step)

    def extend(self, steps) -> None:
        self._steps.extend(steps)

    def undo_all(self) -> list[Exception]:
        """Run every undo step, last first; returns the exceptions raised (the others still ran)."""
        errors = []
        while self._steps:
            try:
                self._steps.pop()()
            except Exception as exc:  # keep restoring the rest
                errors.append(exc)
        return errors

    def __len__(self) -> int:
        return len(self._steps)


def dressed_as(original, fn):
    """A function calling ``fn`` that looks like ``original`` to ``inspect.signature`` (and carries its name and
    docstring): pipelines decide which arguments to pass by reading the signature of what they call (diffusers
    passes ``eta`` and ``generator`` only to a ``scheduler.step`` whose signature names them)."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    wrapper.__signature__ = inspect.signature(original)  # a bound method's: no ``self``
    return wrapper


__all__ = ["Undo", "dressed_as"]
