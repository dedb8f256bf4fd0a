"""Several trials on one GPU: `python benchmarks/packing.py [--k 1,2,4,8] [--steps 20] [--budget-s 240]
[--calibrate-budget-s 90] [--out FILE | --out-dir DIR] [--device cuda|cpu]`.

1. Calibration (benchmarks/calibrate.py, in a subprocess, --calibrate-budget-s; 0 skips it): the
   study's trial shapes, measured step by step.
2. Packing: k = 1, 2, 4, 8 ESC-50-shaped trials (synthetic 5 s clips at 16 kHz, batch 32, the HELIX
   pattern by default) at once on the one GPU, each in its own process with its own CUDA context,
   as Ray runs trials that hold fractional GPUs (time-sliced, no MPS); for each frontend (mel, raw).
   Every trial builds its model and takes 3 warm-up steps, then all start together and take
   --steps optimizer steps (fp16 autocast, grad scaler, AdamW), on a batch already on the device.
   Reported per k: clips/s summed over the trials and its ratio to k = 1, the slowest trial's
   steps/s, the peak memory one trial allocated, and the memory all k held (allocator reserved).
Writes the calibration file (default benchmarks/calibration/<gpu>.json; helix_sweep.training.packing
reads its "steps" and "packing": ratio at k for that shape) and prints a Markdown report (also to
$OUT/packing.md when $OUT is set). Stops starting new cases when --budget-s is spent.

--device cpu is a dry run for the tests (one thread per trial; memory is peak RSS), e.g.
`--device cpu --steps 2 --k 1,2 --batch 2 --clip-seconds 0.5 --calibrate-budget-s 0`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibrate import (  # noqa: E402
    Shape, build_step, default_path, device_header, usable_device, write_calibration,
)

from helix_sweep.models.frontends import SAMPLE_RATE, num_tokens  # noqa: E402

PATTERNS = {"helix": "MMMAMM", "mamba": "MMMMMM", "attention": "AAAAAA"}
WARMUP = 3


def esc50_shape(variant: str, frontend: str, batch: int, clip_seconds: float) -> Shape:
    samples = int(round(clip_seconds * SAMPLE_RATE))
    return Shape(f"esc50-shaped/{variant}-{frontend}", PATTERNS[variant], frontend, num_tokens(frontend, samples),
                 samples, batch, "naive", 256, 32, 50, "fp32")  # ESC-50 trials fit: the plan trains them in fp32


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def trial_process(rank: int, device_name: str, commands: mp.Queue, results: mp.Queue) -> None:
    """One packed trial: builds the step it is told to, warms up, says ready, waits for go, runs."""
    device = torch.device(device_name)
    torch.set_num_threads(1)
    step, built = None, None
    while True:
        cmd = commands.get()
        if cmd is None:
            return
        shape, steps = cmd
        try:
            if built != shape:
                step = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                step, built = build_step(shape, shape.batch, device, "auto"), shape
            for _ in range(WARMUP):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            results.put(("ready", rank))
            assert commands.get() == "go"
            t0 = time.monotonic()
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t1 = time.monotonic()
            if device.type == "cuda":
                peak, reserved = (torch.cuda.max_memory_allocated(device) / 2**30,
                                  torch.cuda.max_memory_reserved(device) / 2**30)
                free, total = torch.cuda.mem_get_info(device)
                used = (total - free) / 2**30
            else:
                peak = reserved = _peak_rss_gib()
                used = 0.0
            results.put(("done", rank, t0, t1, steps * shape.batch, peak, reserved, used))
        except Exception as exc:  # reported, and this trial sits out the case
            results.put(("error", rank, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
            step, built = None, None


def run_case(pool, results: mp.Queue, shape: Shape, k: int, steps: int, timeout: float) -> dict:
    """k trials of `shape` at once; their throughput and memory."""
    for cmds, _ in pool[:k]:
        cmds.put((shape, steps))
    deadline = time.monotonic() + timeout
    ready, done, errors = 0, [], []

    def get():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"k={k}: no answer within {timeout:.0f} s")
        return results.get(timeout=left)
    while ready + len(errors) < k:
        msg = get()
        if msg[0] == "ready":
            ready += 1
        else:
            errors.append(msg[2])
    if errors:
        raise RuntimeError("; ".join(errors))
    for cmds, _ in pool[:k]:
        cmds.put("go")
    while len(done) + len(errors) < k:
        msg = get()
        (done if msg[0] == "done" else errors).append(msg[1:] if msg[0] == "done" else msg[2])
    if errors:
        raise RuntimeError("; ".join(errors))
    rates = [clips / (t1 - t0) for _, t0, t1, clips, *_ in done]
    return {"k": k, "clips_per_s": sum(rates), "slowest_steps_per_s": min(rates) / shape.batch,
            "wall_s": max(d[2] for d in done) - min(d[1] for d in done),
            "peak_gib": max(d[4] for d in done), "reserved_gib": sum(d[5] for d in done),
            "device_used_gib": max(d[6] for d in done)}


def packing(device: torch.device, ks: list[int], steps: int, shapes: list[Shape], budget_s: float,
            log=print, on_entry=None) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    pool = []
    for rank in range(max(ks)):
        cmds = ctx.Queue()
        proc = ctx.Process(target=trial_process, args=(rank, str(device), cmds, results), daemon=True)
        proc.start()
        pool.append((cmds, proc))
    deadline = time.monotonic() + budget_s
    entries = []
    try:
        for shape in shapes:
            base = None
            for k in ks:
                label = f"| {shape.name} @ {shape.tokens} x {shape.batch} | {k} |"
                left = deadline - time.monotonic()
                if left < 5:
                    log(f"{label} skipped (time budget) | | | | |")
                    continue
                try:
                    r = run_case(pool, results, shape, k, steps, left)
                except Exception as exc:
                    log(f"{label} error: {str(exc)[:200]} | | | | |")
                    if isinstance(exc, TimeoutError):
                        return entries  # the pool is stuck in that case: stop here, keep what was measured
                    continue
                base = base or (r["clips_per_s"] if k == 1 else None)
                ratio = r["clips_per_s"] / base if base else None
                entries.append({"shape": shape.name, "pattern": shape.pattern, "frontend": shape.frontend,
                                "tokens": shape.tokens, "batch": shape.batch, "k": k, "steps": steps,
                                "clips_per_s": round(r["clips_per_s"], 2), "ratio": None if ratio is None else
                                round(ratio, 3), "peak_gib": round(r["peak_gib"], 3),
                                "reserved_gib": round(r["reserved_gib"], 3),
                                "device_used_gib": round(r["device_used_gib"], 3)})
                if on_entry:
                    on_entry(entries)
                log(f"{label} {r['clips_per_s']:.1f} | {'-' if ratio is None else f'{ratio:.2f}x'} | "
                    f"{r['slowest_steps_per_s']:.2f} | {r['peak_gib']:.2f} GiB | {r['reserved_gib']:.2f} GiB |")
    finally:
        for cmds, proc in pool:
            cmds.put(None)
        for _, proc in pool:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--k", default="1,2,4,8", help="trials at once, comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per trial")
    ap.add_argument("--variant", default="helix", choices=sorted(PATTERNS))
    ap.add_argument("--frontends", default="mel,raw")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--clip-seconds", type=float, default=5.0)
    ap.add_argument("--budget-s", type=float, default=240.0, help="for the whole run, calibration included")
    ap.add_argument("--calibrate-budget-s", type=float, default=90.0, help="0: no calibration")
    ap.add_argument("--calibrate-args", default="", help="more arguments for benchmarks/calibrate.py")
    ap.add_argument("--out", default="", help="calibration file (default benchmarks/calibration/<gpu>.json)")
    ap.add_argument("--out-dir", default="", help="write <out-dir>/<gpu>.json instead")
    args = ap.parse_args(argv)
    device = usable_device(args.device, "packing")
    if device is None:
        return 1
    started = time.monotonic()
    header = device_header(device)
    path = Path(args.out) if args.out else default_path(device)
    if args.out_dir:
        path = Path(args.out_dir) / default_path(device).name
    lines = [f"# packing ({header['date']}): {header['gpu']}, {header['memory_gb']} GiB, torch {header['torch']}, "
             f"scan_impl=auto runs {header['auto_scan_impl']}", ""]
    if args.calibrate_budget_s > 0:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "calibrate.py"), "--device", args.device,
               "--budget-s", str(args.calibrate_budget_s), "--out", str(path), *args.calibrate_args.split()]
        try:  # it writes the file after every shape; a last shape that overruns is cut off
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.calibrate_budget_s + 60)
            found = proc.stdout.strip() + "\n" + proc.stderr.strip()[-2000:]
        except subprocess.TimeoutExpired as exc:
            found = (exc.stdout or b"").decode() + f"\n(cut off after {args.calibrate_budget_s + 60:.0f} s)"
        lines += ["## Calibration (benchmarks/calibrate.py)", "", found.strip(), ""]
    ks = [int(k) for k in args.k.split(",")]
    shapes = [esc50_shape(args.variant, fe, args.batch, args.clip_seconds) for fe in args.frontends.split(",")]
    lines += [f"## {len(ks)} packings x {len(shapes)} frontends: {args.steps} steps per trial after {WARMUP} warm-up",
              "", "| trial shape @ tokens x batch | k | clips/s (sum) | vs k=1 | steps/s (slowest trial) | "
              "peak / trial | reserved, all k |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    budget = args.budget_s - (time.monotonic() - started)
    header = {**header, "command": "benchmarks/packing.py " + " ".join(argv or sys.argv[1:])}
    save = lambda entries: write_calibration(path, header, packing=[e for e in entries if e["ratio"] is not None])
    entries = packing(device, ks, args.steps, shapes, budget, log=lambda s: (lines.append(s), print(s, flush=True)),
                      on_entry=save)
    save(entries)
    done = f"\n{len(entries)} packed cases in {time.monotonic() - started:.0f} s; wrote {path}"
    lines.append(done)
    print(done)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "packing.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
