"""Scheduling a sweep's trials on N GPUs: the lower bound, greedy list scheduling as Tune does it,
and longest-first ordering by the cost model's GPU-hours (helix_sweep.training.budget).

A job is its wall hours, or (wall hours, GPUs) for a trial whose DDP workers take several GPUs, or
(wall hours, GPUs, share) for workers packed onto a share of a GPU each (helix_sweep.training.packing).
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Iterable, Sequence

from helix_sweep.training import budget


def _job(j: Any) -> tuple[float, int, float]:
    if not isinstance(j, (tuple, list)):
        return float(j), 1, 1.0
    return float(j[0]), int(j[1]), float(j[2]) if len(j) > 2 else 1.0


def lower_bound(durations: Sequence[Any], n_gpus: int) -> float:
    """max(total GPU-time / N, longest job): no schedule can finish sooner."""
    jobs = [_job(j) for j in durations]
    if not jobs:
        return 0.0
    return max(sum(d * g * f for d, g, f in jobs) / n_gpus, max(d for d, _, _ in jobs))


def simulate_makespan(durations: Sequence[Any], n_gpus: int, order: str = "fifo") -> float:
    """Makespan of greedy list scheduling on n_gpus, as Tune and Ray do it: whenever GPUs free up, start
    the earliest pending jobs that fit. A job is hours, (hours, gpus) or (hours, gpus, share): `gpus`
    workers, each on `share` of one GPU (a share < 1 packs several jobs on a GPU; as Ray places
    fractional GPUs, a worker's share lies on one GPU, on the fullest GPU it fits). order: "fifo"
    keeps the given order, "longest_first" sorts by hours x gpus, then hours, descending: a
    multi-GPU job goes first, before 1-GPU jobs fill the GPUs it would wait for; a long packed job
    starts as early as a whole-GPU job of its length (its share does not make it shorter)."""
    jobs = [_job(j) for j in durations]
    if any(g > n_gpus for _, g, _ in jobs):
        raise ValueError(f"a job needs more than n_gpus={n_gpus} GPUs")
    if any(not 0 < f <= 1 for _, _, f in jobs):
        raise ValueError("a job's GPU share must be in (0, 1]")
    if order == "longest_first":
        jobs.sort(key=lambda j: (-j[0] * j[1], -j[0]))
    elif order != "fifo":
        raise ValueError(f"order={order!r} must be 'fifo' or 'longest_first'")
    eps = 1e-9
    free = [1.0] * n_gpus  # the unused share of each GPU
    now, running, pending, end, seq = 0.0, [], list(jobs), 0.0, 0
    while pending or running:
        i = 0
        while i < len(pending):
            d, g, f = pending[i]
            fits = sorted((free[k], k) for k in range(n_gpus) if free[k] >= f - eps)[:g]  # fullest first
            if len(fits) == g:
                gpus = [k for _, k in fits]
                for k in gpus:
                    free[k] -= f
                heapq.heappush(running, (now + d, seq, gpus, f))
                seq += 1
                end = max(end, now + d)
                pending.pop(i)
            else:
                i += 1
        if running:
            now, _, gpus, f = heapq.heappop(running)
            for k in gpus:
                free[k] = min(1.0, free[k] + f)
    return end


def order_longest_first(trials: Iterable[Any], cost: Callable[[budget.PlanTrial], float] | None = None,
                        gpu: budget.Gpu = budget.L40S) -> list[Any]:
    """The trials (as given) sorted by estimated GPU-hours, then wall hours, largest first; ties
    keep their order. Trials that cannot fit (oom) cost 0 and go last."""
    def key(item: Any) -> tuple[float, float]:
        t = budget.as_trial(item)
        try:
            hours = cost(t) if cost else budget.estimate_gpu_hours(t, gpu)
        except budget.InfeasibleTrial:
            return (0.0, 0.0)
        return (-hours, -hours / t.workers)
    return sorted(trials, key=key)


def makespans(plans: Sequence[Any], gpus: int, packed: bool = False) -> dict[str, float]:
    """Wall hours for the runnable plans: FIFO, longest-first, and the lower bound. plans: the
    cost model's TrialPlans, or packing.TrialPacking rows; packed (TrialPacking only): each trial
    on its GPU share, taking its packed wall hours, else on whole GPUs."""
    if packed:
        jobs = [(p.packed_hours, p.workers, p.fraction) for p in plans if p.gpu_hours > 0]
    else:
        jobs = [(p.gpu_hours / p.workers, p.workers) for p in plans
                if getattr(p, "feasibility", "ok") != "oom" and p.gpu_hours > 0]
    return {"fifo": simulate_makespan(jobs, gpus, "fifo"),
            "longest_first": simulate_makespan(jobs, gpus, "longest_first"),
            "lower_bound": lower_bound(jobs, gpus)}
