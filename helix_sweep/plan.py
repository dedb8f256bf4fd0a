"""`python -m helix_sweep.plan [grid=full] [gpus=8] [gpu_memory_gb=48] [attention_impl=naive|sdpa]
[calibration=auto|none|FILE] [gpu="NVIDIA L40S"] [cpus_per_gpu=4]`: the cost and feasibility plan of a
grid, printed.

One row per trial (tokens, peak activations with naive and SDPA attention, TFLOP per step,
GPU-hours, feasibility, micro-batch x accumulation) from the cost model
(helix_sweep.training.budget), with each trial's step measured where a calibration file has it
(source: measured / modelled; helix_sweep.training.packing), its GPU share when packed and its wall
hours there; then the GPU-hours and the makespan on `gpus` GPUs, on whole GPUs and packed: FIFO,
longest-first and the lower bound (helix_sweep.sweep.schedule), with their source. calibration,
gpu and cpus_per_gpu default to the config's plan.calibration, plan.gpu and resources.cpus_per_gpu.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

from helix_sweep.config import ConfigError, load_config
from helix_sweep.sweep.grid import expand_grid
from helix_sweep.sweep.schedule import makespans
from helix_sweep.training.budget import L40S, Gpu, TrialPlan, as_trial, plan_trial
from helix_sweep.training.packing import (
    MAX_TRIALS_PER_GPU, Calibration, CalibrationError, TrialPacking, format_fraction, load_calibration,
    max_trials_per_gpu, plan_packing,
)


def format_table(plans: Sequence[TrialPlan], packing: Sequence[TrialPacking] | None = None) -> str:
    """One row per trial; with `packing`, the source of its step figures (measured / modelled), its
    GPU share when packed and its wall hours there."""
    head = (f"{'trial':<42} {'pattern':<7} {'front':<5} {'tokens':>6} {'act naive':>10} "
            f"{'act sdpa':>9} {'TFLOP/step':>10} {'GPU-h':>7} {'feasible':>8} {'micro x acc':>11}")
    if packing is not None:
        head += f" {'source':>8} {'share':>5} {'packed h':>8}"
    rows = [head, "-" * len(head)]
    for i, p in enumerate(plans):
        mb = f"{p.micro_batch} x {p.grad_accum_steps}" if p.micro_batch else "-"
        row = (f"{p.key:<42} {p.pattern:<7} {p.frontend:<5} {p.tokens:>6} "
               f"{p.act_gib_naive:>8.1f}Gi {p.act_gib_sdpa:>7.1f}Gi {p.tflops_per_step:>10.2f} "
               f"{p.gpu_hours:>7.2f} {p.feasibility:>8} {mb:>11}")
        if packing is not None:
            k = packing[i]
            row += (f" {k.source:>8} {format_fraction(k.fraction):>5} {k.packed_hours:>8.2f}" if k.gpu_hours
                    else f" {'-':>8} {'-':>5} {'-':>8}")
        rows.append(row)
    return "\n".join(rows)


def plan_rows(trials: Iterable[Any], gpu_memory_gb: float = 48.0, attention_impl: str | None = None,
              safety: float = 0.8, gpu: Gpu = L40S, calibration: Calibration | None = None,
              max_trials_per_gpu: int = MAX_TRIALS_PER_GPU, headroom: float = 1.5,
              scan_impl: str = "auto") -> tuple[list[TrialPlan], list[TrialPacking]]:
    """Each trial's plan (its GPU-hours measured where the calibration has its shape) and packing."""
    trials = [as_trial(t) for t in trials]
    if attention_impl is not None:
        trials = [replace(t, attention_impl=attention_impl) for t in trials]
    gpu = replace(gpu, memory_gb=gpu_memory_gb)
    plans = [plan_trial(t, gpu_memory_gb, safety, gpu) for t in trials]
    packing = [plan_packing(t, p, gpu, calibration, max_trials_per_gpu, headroom, scan_impl)
               for t, p in zip(trials, plans)]
    plans = [replace(p, gpu_hours=k.gpu_hours) for p, k in zip(plans, packing)]
    return plans, packing


def source_of(packing: Sequence[TrialPacking]) -> str:
    """Where the plan's GPU-hours and makespans come from: measured, modelled, or both (counted)."""
    run = [k for k in packing if k.gpu_hours > 0]
    measured = sum(k.source == "measured" for k in run)
    if measured == 0:
        return "modelled (cost model; no measured step for these trials)"
    if measured == len(run):
        return "measured (every runnable trial's step)"
    return f"measured for {measured} of {len(run)} runnable trials, modelled for the rest"


def main(trials: Iterable[Any], gpus: int = 8, gpu_memory_gb: float = 48.0,
         attention_impl: str | None = None, safety: float = 0.8, gpu: Gpu = L40S,
         out: Callable[[str], Any] = print, calibration: Calibration | None = None,
         max_trials_per_gpu: int = MAX_TRIALS_PER_GPU, headroom: float = 1.5,
         scan_impl: str = "auto") -> list[TrialPlan]:
    """Print the per-trial table, the GPU-hours and the makespans, whole and packed, each with its
    source; return the plans."""
    plans, packing = plan_rows(trials, gpu_memory_gb, attention_impl, safety, gpu, calibration,
                               max_trials_per_gpu, headroom, scan_impl)
    out(format_table(plans, packing))
    oom = [p.key for p in plans if p.feasibility == "oom"]
    total = sum(p.gpu_hours for p in plans)
    source = source_of(packing)
    out(f"\n{len(plans)} trials, {len(oom)} planned oom (not run), {total:.1f} GPU-hours "
        f"on {gpu_memory_gb:g} GB GPUs")
    if calibration is not None:
        out(f"calibration: {calibration.path} (measured on {calibration.gpu}, {calibration.memory_gb:.0f} GB; "
            f"scan_impl=auto ran {calibration.auto_scan_impl})")
    out(f"source of GPU-hours and makespans: {source}")
    m = makespans(plans, gpus)
    if not m["lower_bound"]:
        out("nothing to run")
        return plans
    out(f"makespan on {gpus} GPUs, whole GPUs: FIFO {m['fifo']:.1f} h, longest-first {m['longest_first']:.1f} h, "
        f"lower bound {m['lower_bound']:.1f} h (longest-first / bound = "
        f"{m['longest_first'] / m['lower_bound']:.3f})")
    pm = makespans(packing, gpus, packed=True)
    shares = Counter(format_fraction(k.fraction) for k in packing if k.gpu_hours > 0)
    used = sum(k.packed_hours * k.fraction * k.workers for k in packing)
    out(f"makespan on {gpus} GPUs, packed ({', '.join(f'{n} trials at {f}' for f, n in sorted(shares.items()))}; "
        f"at most {max_trials_per_gpu} per GPU): FIFO {pm['fifo']:.1f} h, longest-first {pm['longest_first']:.1f} h, "
        f"lower bound {pm['lower_bound']:.1f} h; {used:.1f} GPU-hours of GPU shares")
    out(f"packed / whole GPUs (longest-first): {pm['longest_first'] / m['longest_first']:.2f}")
    return plans


def _cli(argv: Sequence[str]) -> int:
    opts = {"grid": "full", "gpus": "8", "gpu_memory_gb": "48", "attention_impl": None, "calibration": None,
            "gpu": None, "cpus_per_gpu": None}
    for arg in argv:
        k, sep, v = arg.partition("=")
        if not sep or k not in opts:
            raise SystemExit(f"plan: unknown argument {arg!r}; use key=value with keys {list(opts)}")
        opts[k] = v
    try:
        cfg = load_config([f"grid={opts['grid']}"])
        trials = expand_grid(cfg)
        calibration = load_calibration(opts["calibration"] or cfg.plan.calibration, opts["gpu"] or cfg.plan.gpu)
    except (ConfigError, CalibrationError) as exc:
        raise SystemExit(f"plan: config error: {exc}") from None
    ruled = [t.key for t in trials if t.status == "ruled_oom"]  # a grid rule keeps them out: not run, not costed
    r = cfg.resources
    per_gpu = max_trials_per_gpu(float(opts["cpus_per_gpu"] or r.cpus_per_gpu), r.cpus_per_worker)
    main([t for t in trials if t.status != "ruled_oom"], int(opts["gpus"]), float(opts["gpu_memory_gb"]),
         opts["attention_impl"], calibration=calibration, max_trials_per_gpu=per_gpu, headroom=cfg.plan.headroom,
         scan_impl=cfg.model.scan_impl)
    if ruled:
        print(f"{len(ruled)} more ruled oom by the grid's ruled_oom rules (not run, not counted above): "
              f"{', '.join(ruled)}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
