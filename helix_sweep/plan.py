"""`python -m helix_sweep.plan [grid=full] [gpus=8] [gpu_memory_gb=48] [attention_impl=naive|sdpa]`:
the cost and feasibility plan of a grid, printed.

One row per trial (tokens, peak activations with naive and SDPA attention, TFLOP per step,
GPU-hours, feasibility, micro-batch x accumulation) from the cost model
(helix_sweep.training.budget), then the makespan on `gpus` GPUs: FIFO, longest-first and the lower
bound (helix_sweep.sweep.schedule).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

from helix_sweep.config import ConfigError, load_config
from helix_sweep.sweep.grid import expand_grid
from helix_sweep.sweep.schedule import makespans
from helix_sweep.training.budget import L40S, Gpu, TrialPlan, as_trial, plan_trial


def format_table(plans: Sequence[TrialPlan]) -> str:
    head = (f"{'trial':<42} {'pattern':<7} {'front':<5} {'tokens':>6} {'act naive':>10} "
            f"{'act sdpa':>9} {'TFLOP/step':>10} {'GPU-h':>7} {'feasible':>8} {'micro x acc':>11}")
    rows = [head, "-" * len(head)]
    for p in plans:
        mb = f"{p.micro_batch} x {p.grad_accum_steps}" if p.micro_batch else "-"
        rows.append(f"{p.key:<42} {p.pattern:<7} {p.frontend:<5} {p.tokens:>6} "
                    f"{p.act_gib_naive:>8.1f}Gi {p.act_gib_sdpa:>7.1f}Gi {p.tflops_per_step:>10.2f} "
                    f"{p.gpu_hours:>7.2f} {p.feasibility:>8} {mb:>11}")
    return "\n".join(rows)


def main(trials: Iterable[Any], gpus: int = 8, gpu_memory_gb: float = 48.0,
         attention_impl: str | None = None, safety: float = 0.8, gpu: Gpu = L40S,
         out: Callable[[str], Any] = print) -> list[TrialPlan]:
    """Print the per-trial table and the makespans; return the plans."""
    trials = [as_trial(t) for t in trials]
    if attention_impl is not None:
        trials = [replace(t, attention_impl=attention_impl) for t in trials]
    plans = [plan_trial(t, gpu_memory_gb, safety, gpu) for t in trials]
    out(format_table(plans))
    oom = [p.key for p in plans if p.feasibility == "oom"]
    total = sum(p.gpu_hours for p in plans)
    m = makespans(plans, gpus)
    out(f"\n{len(plans)} trials, {len(oom)} planned oom (not run), {total:.1f} GPU-hours "
        f"on {gpu_memory_gb:g} GB GPUs")
    out(f"makespan on {gpus} GPUs: FIFO {m['fifo']:.1f} h, longest-first {m['longest_first']:.1f} h, "
        f"lower bound {m['lower_bound']:.1f} h (longest-first / bound = "
        f"{m['longest_first'] / m['lower_bound']:.3f})" if m["lower_bound"] else "nothing to run")
    return plans


def _cli(argv: Sequence[str]) -> int:
    opts = {"grid": "full", "gpus": "8", "gpu_memory_gb": "48", "attention_impl": None}
    for arg in argv:
        k, sep, v = arg.partition("=")
        if not sep or k not in opts:
            raise SystemExit(f"plan: unknown argument {arg!r}; use key=value with keys {list(opts)}")
        opts[k] = v
    try:
        trials = expand_grid(load_config([f"grid={opts['grid']}"]))
    except ConfigError as exc:
        raise SystemExit(f"plan: config error: {exc}") from None
    ruled = [t.key for t in trials if t.status == "ruled_oom"]  # a grid rule keeps them out: not run, not costed
    main([t for t in trials if t.status != "ruled_oom"], int(opts["gpus"]), float(opts["gpu_memory_gb"]),
         opts["attention_impl"])
    if ruled:
        print(f"{len(ruled)} more ruled oom by the grid's ruled_oom rules (not run, not counted above): "
              f"{', '.join(ruled)}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
