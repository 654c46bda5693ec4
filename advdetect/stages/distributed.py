"""An audit over several processes or hosts with torch.distributed, as ``torchrun`` starts them.

The audited inputs are cut into chunks of ``--batch-size`` rows. Each rank attacks, and computes
detector signatures for, the chunks whose index is its rank modulo the world size; every rank
then gathers the others' chunks, so each holds the whole cell as one process would. The work
on whole sets (fitting detectors, metrics) is cheap and runs on every rank alike; only rank 0
writes the run folder the user asked for, the others a temporary one. A chunk's randomness is
seeded by its index, never by the rank, and a chunk holds the same rows whatever the world size,
so ``results.json`` and the attack cache are the same for any number of processes.

gloo on the CPU, nccl on CUDA (one GPU per local rank).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T", torch.Tensor, np.ndarray)


@dataclass(frozen=True)
class World:
    """This process's place among the audit's processes: rank ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def chunks(self, n_rows: int, chunk: int) -> list[int]:
        """Indices of the chunks of ``chunk`` rows, out of ``n_rows``, that this rank computes."""
        return list(range(self.rank, -(-n_rows // chunk), self.size))

    def map_chunks(self, n_rows: int, chunk: int, compute: Callable[[int, slice], T]) -> T | None:
        """``compute(index, rows)`` for this rank's chunks, then every chunk from every rank, in
        order, concatenated on every rank (None when there are no rows)."""
        mine = {index: compute(index, slice(index * chunk, (index + 1) * chunk))
                for index in self.chunks(n_rows, chunk)}
        if self.size > 1:
            gathered: list[dict[int, Any]] = [{} for _ in range(self.size)]
            dist.all_gather_object(gathered, mine)
            mine = {index: part for parts in gathered for index, part in parts.items()}
        parts = [mine[index] for index in sorted(mine)]
        if not parts:
            return None
        return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.size == 1:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


_current = {"world": World()}


def current_world() -> World:
    """The world of this process: rank 0 of 1 unless :func:`join` ran under torchrun."""
    return _current["world"]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str = "auto") -> World:
    """Join the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...): nccl when CUDA is used, gloo otherwise."""
    if not launched_by_torchrun():
        return current_world()
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    world = World(rank=dist.get_rank(), size=dist.get_world_size())
    _current["world"] = world
    return world


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _current["world"] = World()
