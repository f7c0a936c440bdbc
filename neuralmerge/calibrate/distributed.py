"""Data parallelism for calibration: one process or many under ``torchrun`` (gloo on CPU).

Each process takes every ``world``-th sample of each global batch; the per-sample losses are
summed and divided by the *global* batch size, and gradients are summed across processes, so
N processes compute the one-process step up to float summation order. Gradients are reduced by
hand rather than through ``DistributedDataParallel`` because the student is driven through
``OnnxModule.run`` (several entry points per step), not through a single ``forward``; reducing
explicitly also keeps "this parameter got no gradient" (the other model's head) exact for Adam.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Group:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices):
        """This process's share of a global batch."""
        return indices[self.rank::self.world]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def from_main(self, value):
        """``value`` as computed by rank 0, on every rank (e.g. an encoding, so all ranks train the same codes)."""
        if self.world == 1:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over processes; a parameter no process touched keeps ``grad = None``."""
        if self.world == 1:
            return
        flat = torch.cat([torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1),
                                     torch.tensor([float(p.grad is not None)])]) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            used = flat[offset + n].item() > 0
            p.grad = flat[offset:offset + n].reshape(p.shape).clone() if used else None
            offset += n + 1


def current() -> Group:
    """The process group torchrun set up (``WORLD_SIZE`` > 1), initialised on first use; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Group(dist.get_rank(), dist.get_world_size())
