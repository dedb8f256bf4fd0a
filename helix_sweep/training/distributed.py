"""What the ranks of a multi-worker (DDP) trial do together. The rule: every rank issues the same
collectives in the same order, whatever happens to it.

Per optimizer step each rank runs its forward and backward passes alone (no collective inside
them), then one small all-reduce of flags decides for all ranks whether the step is skipped (a
non-finite loss on some rank), whether the trial stops (out of memory on some rank) and whether a
mid-epoch checkpoint is written after it; only then are the gradients averaged (one all-reduce) and
the optimizer steps. That is why gradients are not averaged by torch's DistributedDataParallel: its
all-reduce runs inside the last backward, so a rank that skips that backward (a NaN loss) or dies in
it (out of memory) leaves the others waiting there until the process-group timeout.

World size 1 (one worker, with or without a process group) issues no collective at all.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
import torch.distributed as dist


class StepFlags(NamedTuple):
    """One rank's view of a step before the decision; after `agree`, the decision of all ranks."""

    nonfinite: bool = False  # a non-finite loss: skip the optimizer step
    oom: bool = False  # out of memory: the trial stops as "oom"
    checkpoint: bool = False  # the mid-epoch checkpoint interval has passed: checkpoint after the step


def collective_device(backend: str, device: torch.device) -> torch.device:
    """The device a collective's tensors must be on under `backend` (dist.get_backend()): the CPU when
    the backend has a CPU implementation (gloo, mpi, ucc, or a "cpu:gloo,cuda:nccl" pair), else the
    trial's device. NCCL has none: it takes CUDA tensors only, and a CPU tensor fails."""
    if ":" in backend:  # one backend per device type
        devices = {part.split(":", 1)[0] for part in backend.split(",")}
    else:  # an unknown (third-party) backend is assumed to take the trial's device
        devices = set(dist.Backend.backend_capability.get(backend.lower(), [device.type]))
    return torch.device("cpu") if "cpu" in devices else device


def group_device(device: torch.device) -> torch.device:
    return collective_device(str(dist.get_backend()), device)


def agree(flags: StepFlags, world_size: int, device: torch.device) -> StepFlags:
    """Each flag set on every rank when it is set on any: one all-reduce (MAX) of a 3-integer tensor.
    Every rank must call it at the same point of the same step."""
    if world_size == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=group_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return StepFlags(*(bool(v) for v in t.tolist()))


def average_gradients(params: Iterable[torch.nn.Parameter], world_size: int, device: torch.device) -> None:
    """Replace each gradient by its mean over the ranks, as DDP does (divide by the world size, then
    sum), in one all-reduce per dtype. Parameters without a gradient are the same on every rank (the
    same graph ran everywhere: a step that did not is skipped on all ranks before this)."""
    if world_size == 1:
        return
    where = group_device(device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        grads = by_dtype[dtype]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(where)
        flat.div_(world_size)
        dist.all_reduce(flat)
        for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(mean.view_as(g))


def broadcast_parameters(module: torch.nn.Module, world_size: int, device: torch.device) -> None:
    """Rank 0's parameters and buffers on every rank (as DDP's constructor does): the ranks start equal
    even if their initialisation drew different numbers."""
    if world_size == 1:
        return
    where = group_device(device)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            local = t.data.to(where)
            dist.broadcast(local, src=0)
            t.data.copy_(local)


def all_gather_states(state: torch.Tensor, world_size: int, device: torch.device) -> list[torch.Tensor]:
    """Every rank's `state` (a CPU generator state), in rank order, on the CPU.

    A tensor all_gather on the group's device rather than all_gather_object: one collective instead
    of two (sizes, then pickles), and the device is explicit, where all_gather_object under NCCL
    relies on torch.cuda.current_device() being this rank's GPU. A CPU generator's state has the same
    size on every rank, so no sizes need exchanging."""
    if world_size == 1:
        return [state]
    local = state.to(group_device(device))
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    return [g.cpu() for g in gathered]
