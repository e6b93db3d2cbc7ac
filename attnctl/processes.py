"""Several processes (or GPUs) on one job: where this process stands, and how the CLI launches the others.

Verbs that split work (``attnctl run``, ``attnctl hunt``) run under ``accelerate launch --multi_gpu
--num_processes N -m attnctl VERB ...`` (on CPU machines too: ``PartialState(cpu=True)`` uses gloo), or relaunch
themselves that way when given ``--distributed N``. Each process learns its rank and world from ``Processes``;
the work is split by rank and the results gathered with accelerate's object collectives.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch


class Processes:
    """This process's place among the launched ones (accelerate), or a single process.

    ``distributed``: True joins the launched group (a group of one without a launcher), False never does, None
    joins when launched (``WORLD_SIZE`` > 1 under accelerate/torchrun).
    """

    def __init__(self, distributed: bool | None = None):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.state = None
        if distributed or (distributed is None and world > 1):
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1
        self.device = str(self.state.device) if self.state and self.world > 1 else None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value):
        """Process 0's ``value`` on every process."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box)
        return box[0]

    def gather(self, values: list) -> list:
        """Every process's ``values`` concatenated in rank order, on every process."""
        if self.world == 1:
            return values
        from accelerate.utils import gather_object

        return gather_object(values)

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def launched() -> bool:
    """Whether this process was started by a launcher (accelerate, torchrun): then ``--distributed`` is already
    in effect and must not launch again (``--dist 2``, an abbreviation argparse accepts, would escape
    ``without_option`` and start processes without end)."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def relaunch(argv: list[str], processes: int) -> int:
    """Run ``attnctl ARGV`` (with ``--distributed`` removed) as ``processes`` processes under accelerate's
    launcher; returns its exit status."""
    from .errors import AttnctlError

    if processes < 1:
        raise AttnctlError(f"--distributed {processes}: give a number of processes >= 1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "attnctl"]
    return subprocess.run(cmd + without_option(argv, "--distributed"), env=dict(os.environ)).returncode


__all__ = ["Processes", "launched", "relaunch", "without_option"]
