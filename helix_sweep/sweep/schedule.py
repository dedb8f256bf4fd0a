"""Scheduling a sweep's trials on N GPUs: the lower bound, greedy list scheduling as Tune does it,
and longest-first ordering by the cost model's GPU-hours (helix_sweep.training.budget).

A job is its wall hours, or (wall hours, GPUs) for a trial whose DDP workers take several GPUs.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Iterable, Sequence

from helix_sweep.training import budget


def _job(j: Any) -> tuple[float, int]:
    return (float(j[0]), int(j[1])) if isinstance(j, (tuple, list)) else (float(j), 1)


def lower_bound(durations: Sequence[Any], n_gpus: int) -> float:
    """max(total GPU-time / N, longest job): no schedule can finish sooner."""
    jobs = [_job(j) for j in durations]
    if not jobs:
        return 0.0
    return max(sum(d * g for d, g in jobs) / n_gpus, max(d for d, _ in jobs))


def simulate_makespan(durations: Sequence[Any], n_gpus: int, order: str = "fifo") -> float:
    """Makespan of greedy list scheduling on n_gpus, as Tune does it: whenever GPUs free up, start
    the earliest pending jobs that fit. A job is hours or (hours, gpus). order: "fifo" keeps the
    given order, "longest_first" sorts by GPU-time (hours x gpus), then hours, descending: a
    multi-GPU job goes first, before 1-GPU jobs fill the GPUs it would wait for."""
    jobs = [_job(j) for j in durations]
    if any(g > n_gpus for _, g in jobs):
        raise ValueError(f"a job needs more than n_gpus={n_gpus} GPUs")
    if order == "longest_first":
        jobs.sort(key=lambda j: (-j[0] * j[1], -j[0]))
    elif order != "fifo":
        raise ValueError(f"order={order!r} must be 'fifo' or 'longest_first'")
    now, free, running, pending, end = 0.0, n_gpus, [], list(jobs), 0.0
    while pending or running:
        i = 0
        while i < len(pending):
            d, g = pending[i]
            if g <= free:
                free -= g
                heapq.heappush(running, (now + d, g))
                end = max(end, now + d)
                pending.pop(i)
            else:
                i += 1
        if running:
            now, g = heapq.heappop(running)
            free += g
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


def makespans(plans: Sequence[budget.TrialPlan], gpus: int) -> dict[str, float]:
    """Wall hours for the runnable plans: FIFO, longest-first, and the lower bound."""
    jobs = [(p.gpu_hours / p.workers, p.workers) for p in plans if p.feasibility != "oom"]
    return {"fifo": simulate_makespan(jobs, gpus, "fifo"),
            "longest_first": simulate_makespan(jobs, gpus, "longest_first"),
            "lower_bound": lower_bound(jobs, gpus)}
