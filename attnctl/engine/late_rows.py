"""Late-join rows: an extra branch's rows enter the batch at the first denoiser block where a control acts.

Extra rows (PAG's perturbed rows) are copies of the cond rows, and before the first block where any control acts
on attention every row computes exactly what its cond row computes; so the denoiser runs the original rows up to
that block, and a forward pre-hook there (and on every later block and tail module, the adapter's
``blocks``) widens each batch-major argument with the copies. PAG on SDXL's mid block skips the whole down path
for the perturbed rows. Arguments that add residuals between blocks (ControlNet: the adapter's
``late_rows_blockers``) make the rows run from the start instead.
"""

from __future__ import annotations

import inspect

import torch

from .install import Undo
from .rows import Frame, take_rows


class LateRows:
    """The late-join hooks of one session, and the join pending for the running denoiser call."""

    def __init__(self, session):
        self.session = session
        self.blocks: list[tuple[str, torch.nn.Module]] = []
        self.join_block: int | None = None  # index (in blocks) of the first block with a hooked site
        self.pending: tuple[list[int], int, Frame] | None = None  # (rows, n, wide frame) for the running call
        self.joined_at: str | None = None  # the block where rows joined in this pipeline call

    def install(self, undo: Undo) -> None:
        """Find the first block holding a hooked site and hook it and every block and tail module after it."""
        session = self.session
        adapter = session.adapter
        self.blocks = adapter.blocks(session.denoiser)
        hooked = set(session.hooks)
        for index, (name, _) in enumerate(self.blocks):
            if any(site == name or site.startswith(name + ".") for site in hooked):
                self.join_block = index
                break
        if not self.join_block:  # no hooked site in any block, or the first block: nothing to share
            self.join_block = None
            return
        skip = adapter.unbatched_args | adapter.block_unbatched_args
        for _, module in self.blocks[self.join_block:]:
            signature = inspect.signature(module.forward)

            def widen(module, args, kwargs, signature=signature):
                if self.pending is None:
                    return None
                rows, n, frame = self.pending
                session.frame = frame  # from here on the processors see the wide batch's layout
                bound = signature.bind(*args, **kwargs)
                for name, value in bound.arguments.items():
                    kind = signature.parameters[name].kind
                    if name in skip:
                        continue
                    if kind is inspect.Parameter.VAR_POSITIONAL:
                        bound.arguments[name] = tuple(take_rows(v, rows, n, skip) for v in value)
                    elif kind is inspect.Parameter.VAR_KEYWORD:
                        bound.arguments[name] = {k: take_rows(v, rows, n, skip, k) for k, v in value.items()}
                    else:
                        bound.arguments[name] = take_rows(value, rows, n, skip)
                return bound.args, bound.kwargs

            handle = module.register_forward_pre_hook(widen, with_kwargs=True)
            undo.push(handle.remove)

    def can_join(self, params: dict) -> bool:
        """Whether a call with ``params`` can take its extra rows late (a hooked block, no blocking argument)."""
        blockers = self.session.adapter.late_rows_blockers
        return self.join_block is not None and not any(params.get(a) is not None for a in blockers)

    def plan(self, rows: list[int], n: int, wide: Frame) -> tuple[list[int], int, Frame]:
        """Record that the running call's rows ``rows`` (indices into its ``n`` rows) join at the join block."""
        self.joined_at = self.blocks[self.join_block][0]
        return rows, n, wide


__all__ = ["LateRows"]
