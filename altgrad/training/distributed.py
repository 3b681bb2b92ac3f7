"""One run on several processes: `torch.distributed` as `torchrun` starts it (data parallel).

``torchrun --standalone --nproc_per_node N $(which altgrad) train ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; the trainer then wraps the model in
`DistributedDataParallel` (NCCL on CUDA, gloo on CPU), and:

- every rank reads a disjoint share of the single-process run's global batch: whole
  micro-batches when ``grad_accum`` is a multiple of the world size, else equal row slices of
  every micro-batch (``batch_size`` a multiple of it). The gradients DDP averages are then the
  single-process run's, up to the order of float additions. With whole micro-batches every FP8
  cast sees the tensor it sees in one process; a row slice has its own per-tensor amax scale
  (as in real data-parallel FP8 training), so only the micro-batch split repeats a
  one-process FP8 run (tested: equal losses);
- gradients are synchronised on the last local micro-step only;
- everything random that touches the weights draws the same bits on every rank: the weight
  casts' and the optimizer's generators are seeded from the run's seed alone, and every rank
  applies the same (all-reduced) gradient, so replicas never drift;
- rank 0 alone evaluates, logs, writes checkpoints, W&B and the summary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """Each rank's device: its local GPU under CUDA, else the requested one."""
        if requested.type == "cuda" and self.active:
            return torch.device("cuda", self.local_rank)
        return requested

    # ---- collectives (no-ops in a single process) --------------------------------------------
    def mean(self, value: float, device: torch.device) -> float:
        """The mean of a scalar over ranks."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors over ranks in place (e.g. the FP32 shadow's gradients)."""
        if self.active:
            for tensor in tensors:
                dist.all_reduce(tensor)
                tensor.div_(self.world)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on one (e.g. a stop signal that reached one process)."""
        if not self.active:
            return flag
        tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def share(self, micro_batches: int, batch_size: int) -> tuple[list[int], slice]:
        """This rank's micro-batch indices and the rows of each it reads."""
        if not self.active:
            return list(range(micro_batches)), slice(None)
        if micro_batches % self.world == 0:
            return [m for m in range(micro_batches) if m % self.world == self.rank], slice(None)
        if batch_size % self.world == 0:
            rows = batch_size // self.world
            return list(range(micro_batches)), slice(self.rank * rows, (self.rank + 1) * rows)
        raise UserError(f"{self.world} processes need grad_accum ({micro_batches}) or batch_size ({batch_size}) "
                        "to be a multiple of the number of processes, so that each reads an equal share")


def peer_lost(error: BaseException) -> bool:
    """Whether a collective failed because another process of the job went away."""
    text = str(error).lower()
    return any(marker in text for marker in ("connection closed", "connection reset", "broken pipe",
                                             "closed by peer", "remote process exited", "watchdog"))


def context() -> Context:
    """The process's place in a torchrun job (a single process without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    return Context(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def start(ctx: Context, device: torch.device) -> bool:
    """Join the process group (NCCL on CUDA, gloo otherwise); False when there is none to join or
    the caller had joined it already (then it is the caller's to leave)."""
    if not ctx.active or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def stop(joined: bool) -> None:
    if joined and dist.is_initialized():
        dist.destroy_process_group()
