"""Simulated makespan of the full study grid: FIFO (grid order) vs longest-first vs the lower bound
max(total GPU-time / N, longest trial), from the planner's per-trial GPU-hour estimates.

    python benchmarks/makespan.py [gpus=8] [attention_impl=naive|sdpa] [write=1]

write=1 replaces the "## makespan" section of benchmarks/RESULTS.md with the figures.
"""

from __future__ import annotations

import datetime
import re
import sys
from dataclasses import replace
from pathlib import Path

from helix_sweep.config import load_config
from helix_sweep.sweep.grid import expand_grid
from helix_sweep.sweep.schedule import makespans
from helix_sweep.training import budget

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def grid_trials() -> tuple[list[budget.PlanTrial], str]:
    return [budget.as_trial(t) for t in expand_grid(load_config(["grid=full"]))], \
        "grid=full (helix_sweep.sweep.grid.expand_grid)"


def run(gpus: int, attention_impl: str | None) -> tuple[str, dict]:
    trials, source = grid_trials()
    if attention_impl:
        trials = [replace(t, attention_impl=attention_impl) for t in trials]
    plans = [budget.plan_trial(t) for t in trials]
    m = makespans(plans, gpus)
    runnable = [p for p in plans if p.feasibility != "oom"]
    longest = max(runnable, key=lambda p: p.gpu_hours / p.workers)
    impl = attention_impl or trials[0].attention_impl
    lines = [
        f"- trials: {len(plans)} from {source}, attention_impl={impl}; "
        f"{len(plans) - len(runnable)} planned oom (not run)"
        + "".join(f", {p.key}" for p in plans if p.feasibility == "oom"),
        f"- total {sum(p.gpu_hours for p in runnable):.1f} GPU-hours; longest trial "
        f"{longest.key} {longest.gpu_hours / longest.workers:.1f} h on {longest.workers} GPU(s)",
        f"- {gpus} GPUs: FIFO {m['fifo']:.2f} h, longest-first {m['longest_first']:.2f} h, "
        f"lower bound {m['lower_bound']:.2f} h",
        f"- ratios to the bound: FIFO {m['fifo'] / m['lower_bound']:.3f}, "
        f"longest-first {m['longest_first'] / m['lower_bound']:.3f}",
    ]
    return "\n".join(lines), m


STUDY_HOURS = {  # the SPEC's compute scale, GPU-hours per variant
    "esc50": "< 5", "urbansound8k": "< 5", "speechcommands": "~12", "voxpopuli": "65+"}


def study_comparison() -> str:
    """Estimated GPU-hours per variant (all folds) next to the study's figures."""
    trials, _ = grid_trials()
    rows = ["| dataset | variant | estimated GPU-h (all folds) | study |", "|---|---|---|---|"]
    for dataset, study in STUDY_HOURS.items():
        for variant in ("mamba-raw", "helix-raw", "attention-raw"):
            chosen = [t for t in trials if t.key.startswith(f"{dataset}/{variant}/")]
            try:
                hours = f"{sum(budget.estimate_gpu_hours(t) for t in chosen):.1f}"
            except budget.InfeasibleTrial:
                hours = "oom (naive)"
            rows.append(f"| {dataset} | {variant} | {hours} | {study} |")
    return "\n".join(rows)


def sweep_side() -> str:
    """What the sweep does with the plan (grid=full, naive attention, 48 GB): trials it records as
    planned_oom and the micro-batch x accumulation it gives the trials that do not fit whole."""
    specs = expand_grid(load_config(["grid=full"]))
    oom = [t.key for t in specs if t.status == "planned_oom"]
    runnable = [(t, t.budget.micro_batch, t.budget.grad_accum) for t in specs if t.status == "run"]
    split = sorted({(t.dataset, t.variant, m, a, t.resources.num_workers)
                    for t, m, a in runnable if m < t.train.batch_size})  # DDP share or accumulation
    ruled = [f"{t.key} ({t.budget.oom_reason})" for t in specs if t.status == "ruled_oom"]
    lines = [f"- recorded as planned_oom without GPU time: {', '.join(oom) or 'none'}"]
    lines += [f"- recorded as ruled_oom (a grid rule) without GPU time: {', '.join(ruled)}"] if ruled else []
    lines += [f"- {d}/{v}: micro-batch {m} x {a} accumulation steps x {w} worker(s) = "
              f"{m * a * w} clips per optimizer step" for d, v, m, a, w in split]
    lines.append(f"- the other {len(runnable) - len(split)} runnable trials: the whole batch of 32 in one step")
    return "\n".join(lines)


def write_section(body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = "## makespan\n\n" + body.rstrip() + "\n"
    pattern = re.compile(r"^## makespan\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) \
        else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


def main(argv: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in argv)
    gpus = int(opts.get("gpus", 8))
    parts = [f"Command: `python benchmarks/makespan.py {' '.join(argv)}`",
             f"Date: {datetime.date.today().isoformat()}. GPU model: {budget.L40S} "
             "(helix_sweep.training.budget.Gpu, assumptions).", ""]
    for impl in ([opts["attention_impl"]] if "attention_impl" in opts else ["naive", "sdpa"]):
        body, _ = run(gpus, impl)
        print(f"attention_impl={impl}\n{body}\n")
        parts += [f"attention_impl={impl}:", body, ""]
    study = study_comparison()
    print(study)
    parts += ["GPU-hours per variant (naive attention) against the study's figures:", study, ""]
    sweep = sweep_side()
    print(sweep)
    parts += ["In the sweep (`python -m helix_sweep.run grid=full`, naive attention, "
              "resources.gpu_memory_gb=48; on a GPU cluster):", sweep, ""]
    if opts.get("write") == "1":
        write_section("\n".join(parts))
        print(f"wrote the makespan section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
