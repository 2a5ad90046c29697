"""Data-parallel training under ``torchrun``: the process group, the data shards, the collectives.

``mtrank train`` runs unchanged under ``torchrun --nproc_per_node N``: torchrun sets
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (and the rendezvous address), :func:`setup` sees them and
joins the process group - gloo on CPU, nccl when training on CUDA - and the trainer wraps the
model in DistributedDataParallel. Without those variables (or with ``WORLD_SIZE=1``) everything is
the plain single-process path.

What is chosen (the trainer, :mod:`training.train`, follows these):

* **Batches**: ``batch_size`` stays the *global* batch: each of the W ranks takes
  ``batch_size // W`` rows per step. Every rank draws the same permutation of the training rows
  each epoch (same seed), and rank r takes every W-th row from position r; so the W local
  batches of step b are exactly the rows of the single-process run's batch b, and DDP's gradient
  average is that batch's gradient (up to BatchNorm, whose batch statistics are per rank, and
  losses normalised over a subset such as watch time on clicked rows). Each rank has the same
  number of rows (the last ``len % W`` rows of an epoch's permutation wait for the next epoch).
* **Validation and test metrics**: each rank scores its share of the rows, the predictions are
  gathered to every rank and every rank computes the metrics on all of them - the numbers are
  those of one process, identical on every rank, so every rank takes the same early-stopping
  decision and stops at the same epoch. BatchNorm running statistics are first broadcast from
  rank 0, so all ranks score with the same model.
* **Rank 0 only**: progress bars and epoch lines, the report, the export and the bundle; the
  bundle path (or the export's error) is then broadcast, so every rank returns the same result.
* **Seeds**: the model is initialised from the same seed everywhere (DDP also broadcasts rank 0's
  parameters); dropout is seeded per rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, world size and the device it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, writes the report and exports."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``cpu`` | ``cuda`` | ``auto`` (CUDA when available) -> the device of this process."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device != "cpu":
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device("cpu")


def setup(device: str = "cpu") -> tuple[Context, bool]:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; returns ``(context, owns_group)``.

    ``owns_group``: this call initialised the group, so the caller destroys it (:func:`teardown`);
    a group that was already initialised (by a caller of :func:`training.train.train`) is left alone."""
    world = env_world_size()
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Context(device=resolve_device(device)), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    owns = not dist.is_initialized()
    if owns:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=dev), owns


def teardown(owns_group: bool) -> None:
    if owns_group and dist.is_initialized():
        dist.destroy_process_group()


def current(device: str = "cpu") -> Context:
    """The context of an already-initialised group (or of the single process), training on ``device``."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dist.is_available() and dist.is_initialized():
        return Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=dev)
    return Context(device=dev)


def shard(order: np.ndarray, ctx: Context) -> np.ndarray:
    """This rank's rows of an epoch's permutation: every W-th from position ``rank``, the same count
    on every rank (see the module doc)."""
    if not ctx.parallel:
        return order
    per_rank = len(order) // ctx.world
    return order[ctx.rank::ctx.world][:per_rank]


def gather(arrays: dict[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
    """Every rank's arrays concatenated in rank order, on every rank (pickled through the group)."""
    if not ctx.parallel:
        return arrays
    parts: list = [None] * ctx.world
    dist.all_gather_object(parts, arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


def broadcast(obj, ctx: Context, src: int = 0):
    """``obj`` of rank ``src`` on every rank."""
    if not ctx.parallel:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_buffers(model: torch.nn.Module, ctx: Context) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if ctx.parallel:
        for b in model.buffers():
            dist.broadcast(b, src=0)
