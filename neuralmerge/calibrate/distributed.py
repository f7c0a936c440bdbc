"""Data parallelism for calibration and composition: one process or many under ``torchrun`` (gloo on CPU).

Each process takes every ``world``-th sample of each global batch; the per-sample losses are
summed and divided by the *global* batch size, and gradients are summed across processes, so
N processes compute the one-process step up to float summation order. Gradients are reduced by
hand rather than through ``DistributedDataParallel`` because the student is driven through
``OnnxModule.run`` (several entry points per step), not through a single ``forward``; reducing
explicitly also keeps "this parameter got no gradient" (the other model's head) exact for Adam.
BatchNorm layers normalise by the statistics of the global batch (:func:`synchronized_batch_norm`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch import nn

from ..errors import NeuralMergeError

T = TypeVar("T")


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

    def run_on_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` run by rank 0 only, its result on every rank; a user error is raised on every rank.

        For work whose result every process needs but only one should do: teachers that write a cache.
        """
        if self.world == 1:
            return compute()
        result = error = None
        if self.is_main:
            try:
                result = compute()
            except NeuralMergeError as exc:  # so the other ranks fail with it instead of waiting for a result
                error = exc
        result, error = self.from_main((result, error))
        if error is not None:
            raise error
        return result

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


def _synchronized_forward(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in training mode with the mean and variance of the whole global batch, summed over processes.

    Written by hand because ``torch.nn.SyncBatchNorm`` refuses CPU tensors. The sums go through the
    autograd-aware all-reduce, so each process's gradient includes what its samples did to the shared
    statistics; they are float64 because the variance is E[x²] - E[x]².
    """
    if not norm.training:  # running statistics, the same on every process
        return type(norm).forward(norm, x)
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    wide = x.double()
    count = torch.tensor([x.numel() / max(channels, 1)], dtype=torch.float64)
    totals = dist_autograd.all_reduce(torch.cat([wide.sum(dims), (wide * wide).sum(dims), count]))
    n = totals[-1]
    mean = totals[:channels] / n
    var = (totals[channels:2 * channels] / n - mean * mean).clamp_min(0)
    if norm.track_running_stats:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
            norm.running_mean.mul_(1 - momentum).add_(momentum * mean.to(x.dtype))
            norm.running_var.mul_(1 - momentum).add_(momentum * (var * n / (n - 1).clamp_min(1)).to(x.dtype))
    shape = [1, channels] + [1] * (x.dim() - 2)
    y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + norm.eps)
    if norm.affine:
        y = y * norm.weight.view(shape) + norm.bias.view(shape)
    return y


@contextmanager
def synchronized_batch_norm(model: nn.Module, group: Group) -> Iterator[None]:
    """Within the block, ``model``'s BatchNorm layers train on global-batch statistics (several processes).

    Every process must then run the forward pass of every step, even on an empty share. One process:
    nothing changes.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if group.world > 1 else []
    for norm in norms:
        norm.forward = _synchronized_forward.__get__(norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def current() -> Group:
    """The process group torchrun set up (``WORLD_SIZE`` > 1), initialised on first use; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Group(dist.get_rank(), dist.get_world_size())
