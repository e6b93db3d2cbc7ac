"""Loaded pipelines, shared by every request, used by one generation at a time each.

The cache is keyed by (model string, device, dtype). ``use`` holds that pipeline's lock for the whole
generation, so requests on the same model queue behind each other (concurrency 1 per model) while other models
may run. Nothing a request sets survives it: attnctl.apply hooks attention per call and restores everything, and
``use`` puts back the scheduler a recipe may have swapped.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator


class _Entry:
    def __init__(self):
        self.lock = threading.Lock()
        self.pipe = None


class PipelineCache:
    """Model string -> loaded pipeline, at most ``max_models`` kept (least recently used dropped first)."""

    def __init__(self, loader: Callable | None = None, max_models: int = 2):
        if loader is None:
            from ..models import load as loader
        self.loader = loader
        self.max_models = max_models
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._guard = threading.Lock()

    def _entry(self, key: tuple) -> _Entry:
        with self._guard:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
            self._entries.move_to_end(key)
            return entry

    def _evict(self) -> None:
        with self._guard:
            for key in list(self._entries)[: max(0, len(self._entries) - self.max_models)]:
                entry = self._entries[key]
                if entry.lock.acquire(blocking=False):  # never drop a pipeline that is generating
                    try:
                        del self._entries[key]
                    finally:
                        entry.lock.release()

    def busy(self, model: str, device: str = "auto", dtype: str = "auto") -> bool:
        entry = self._entries.get((model, device, dtype))
        return entry is not None and entry.lock.locked()

    @contextlib.contextmanager
    def use(self, model: str, device: str = "auto", dtype: str = "auto") -> Iterator:
        """The pipeline for ``model``, loaded on first use, exclusively for the duration of the block."""
        entry = self._entry((model, device, dtype))
        with entry.lock:
            if entry.pipe is None:
                entry.pipe = self.loader(model, device=device, dtype=dtype)
            pipe = entry.pipe
            scheduler = getattr(pipe, "scheduler", None)
            try:
                yield pipe
            finally:
                if scheduler is not None:
                    pipe.scheduler = scheduler
        self._evict()
