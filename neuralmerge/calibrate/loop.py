"""The data-parallel training loop shared by calibration and composition (one process or many, see distributed.py).

Every process walks the same seeded global batches; :func:`train_step` gives each its share
(``Group.shard``), whose loss is this share's part of the *global*-batch loss (per-sample terms
divided by the global batch size), then sums gradients over processes and steps the optimizer, so N
processes take the one-process step. Held-out measures are totals summed over processes
(:func:`sharded_totals`), so every process sees the same numbers and keeps the same best epoch
(:func:`run_epochs`). It lives next to distributed.py: composition imports both from here.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import Group

T = TypeVar("T")
Indices = np.ndarray | torch.Tensor


def progress(items: Iterable[T], group: Group, enabled: bool, **options: Any) -> Iterable[T]:
    """A tqdm bar over ``items`` on rank 0 only (and only when ``enabled``)."""
    return tqdm(items, leave=False, disable=not enabled or not group.is_main, **options)


def train_step(group: Group, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], batch: Indices,
               shard_loss: Callable[[Indices, Indices], torch.Tensor],
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> torch.Tensor:
    """One optimizer step on the global ``batch``; return this process's loss terms (float64, detached).

    ``shard_loss(shard, batch)`` returns a 1-D tensor whose first entry is the shard's share of the
    global-batch loss (it is backpropagated; the shares of all processes add up to the loss) and whose
    other entries are parts worth logging, on the same scale. Without a gradient (an empty shard) nothing
    is backpropagated; the process still joins the gradient sum.
    """
    optimizer.zero_grad(set_to_none=True)
    terms = shard_loss(group.shard(batch), batch)
    if terms.requires_grad:
        terms[0].backward()
    group.reduce_gradients(params)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return terms.detach().to(torch.float64)


def sharded_totals(group: Group, rows: Indices, size: int, chunk: int,
                   measure: Callable[[Indices], torch.Tensor]) -> torch.Tensor:
    """Sum of ``measure(part)`` (``size`` numbers) over ``rows``: each process measures its share, without gradients."""
    totals = torch.zeros(size, dtype=torch.float64)
    shard = group.shard(rows)
    with torch.no_grad():
        for start in range(0, len(shard), chunk):
            totals += measure(shard[start:start + chunk]).to(torch.float64)
    return group.sum_(totals)


def new_state(*, best_key: tuple | None = None, best: Any = None, best_epoch: int = 0) -> dict[str, Any]:
    """The state :func:`run_epochs` advances (plain data, so a checkpoint can save it)."""
    return {"epoch": 0, "history": [], "best_epoch": best_epoch, "best_key": best_key, "best": best, "bad_epochs": 0}


def run_epochs(state: dict[str, Any], epochs: int, *, train_epoch: Callable[[int], dict[str, Any]],
               evaluate: Callable[[], tuple[dict[str, Any], tuple | None]], snapshot: Callable[[], Any],
               patience: int | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
               epoch_bar: Callable[[range], Iterable[int]] | None = None) -> bool:
    """Train from ``state["epoch"] + 1`` to ``epochs``, keeping the best held-out state; return "stopped early".

    ``train_epoch(epoch)`` and the measures of ``evaluate()`` make the epoch's history record;
    ``evaluate``'s key (higher is better, ``None``: nothing held out) decides whether ``snapshot()``
    becomes ``state["best"]``. After ``patience`` epochs without improvement training stops.
    ``on_epoch(state)`` runs after every epoch (checkpoints). Restoring the best state is the caller's.
    """
    stopped = patience is not None and state["bad_epochs"] >= patience
    remaining = range(state["epoch"] + 1, epochs + 1)
    for epoch in (epoch_bar(remaining) if epoch_bar is not None else remaining):
        if stopped:
            break
        record = {"epoch": epoch, **train_epoch(epoch)}
        measures, key = evaluate()
        record.update(measures)
        state["history"].append(record)
        state["epoch"] = epoch
        if key is not None and (state["best_key"] is None or tuple(key) > tuple(state["best_key"])):
            state.update(best_key=tuple(key), best=snapshot(), best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        stopped = patience is not None and state["bad_epochs"] >= patience and epoch < epochs
        if on_epoch is not None:
            on_epoch(state)
    return stopped
