"""Measured step figures for the planner, on this machine's GPU: `python benchmarks/calibrate.py
[--budget-s 90] [--grid full] [--out FILE] [--device cuda|cpu] [--batch-cap N] [--scan-impls auto]`.

For every trial shape of a grid (variant x dataset: pattern, frontend, tokens per clip, attention
impl, the per-worker batch; the study's grid=full by default), one optimizer step as the training
loop runs it on a GPU (in the trial's planned precision: fp32, or fp16 autocast with a grad
scaler; clipping, AdamW), on a batch already on the
device: its wall time (median of up to 3 after a warm-up), its peak and static memory
(torch.cuda.max_memory_allocated, memory_allocated before it), and the share of the step the GPU
is busy (CUDA kernel time from torch.profiler over the wall time). A batch that does not fit is
halved. Shapes go longest first (they weigh most in the plan) until the budget is spent; the rest
stay modelled. Writes the "steps" of a calibration file (helix_sweep.training.packing reads it;
default benchmarks/calibration/<gpu>.json), keeping the file's other sections (packing).

--device cpu is a dry run (small grids only, e.g. --grid smoke --batch-cap 2): no utilisation,
peak RSS for memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helix_sweep.models import build_classifier  # noqa: E402
from helix_sweep.models.frontends import SAMPLE_RATE  # noqa: E402
from helix_sweep.models.scan import resolve_scan_impl  # noqa: E402
from helix_sweep.run import plan_trials  # noqa: E402

FORMAT = 1  # helix_sweep.training.packing.FORMAT
CALIBRATION_DIR = ROOT / "benchmarks" / "calibration"


@dataclass(frozen=True)
class Shape:
    """One trial shape of a grid, as the planner looks it up."""

    name: str  # e.g. "esc50/helix-mel" (the first variant x dataset with this shape)
    pattern: str
    frontend: str
    tokens: int
    samples: int  # per clip
    batch: int  # clips per worker per optimizer step
    attention_impl: str
    d_model: int
    d_state: int
    num_classes: int
    precision: str = "fp16"  # what the trial trains in on a GPU: fp32, fp16 or bf16 (autocast)


def gpu_slug(name: str) -> str:
    """As helix_sweep.training.packing.gpu_slug (that module needs the training package's deps)."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def grid_shapes(grid: str = "full", datasets: list[str] | None = None) -> list[Shape]:
    """The distinct shapes of a grid's planned trials (variants x datasets with each dataset's
    frontends, model and resource overrides, and the precision the plan resolved for the trial:
    fp32 unless memory needs fp16), longest (tokens x batch) first."""
    _, trials = plan_trials([f"grid={grid}"] + ([f"datasets=[{','.join(datasets)}]"] if datasets else []))
    shapes: dict[tuple, Shape] = {}
    for t in trials:
        if t.status != "run":  # kept out by the plan or a rule: nothing to measure
            continue
        samples = int(round(t.clip_seconds * SAMPLE_RATE))
        s = Shape(f"{t.dataset}/{t.variant}", t.pattern, t.frontend, t.tokens, samples,
                  t.train.batch_size // t.resources.num_workers, t.model.attention_impl, t.model.d_model,
                  t.model.d_state, t.num_classes, t.budget.precision or "fp16")
        key = (s.pattern, s.frontend, s.tokens, s.attention_impl if "A" in s.pattern else "-", s.batch, s.precision)
        shapes.setdefault(key, s)
    return sorted(shapes.values(), key=lambda s: -s.tokens * s.batch)


def usable_device(name: str, tool: str) -> torch.device | None:
    """The device a benchmark asked for, or None (said why) for CUDA on a machine without it."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{tool}: no CUDA device; run this on a GPU machine (or --device cpu for a dry run)")
        return None
    return device


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build_step(shape: Shape, batch: int, device: torch.device, scan_impl: str):
    """The training loop's optimizer step for this shape on a fixed batch on the device."""
    model = build_classifier(shape.pattern, shape.frontend, shape.num_classes, d_model=shape.d_model,
                             d_state=shape.d_state, attention_impl=shape.attention_impl,
                             scan_impl=scan_impl).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cuda = device.type == "cuda"
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(shape.precision) if cuda else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, shape.samples, generator=g).mul_(0.1).to(device)  # (B, T)
    y = torch.randint(0, shape.num_classes, (batch,), generator=g).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)  # (B, C)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_seconds(step, device: torch.device) -> float | None:
    """CUDA kernel time of one step (torch.profiler), or None where it cannot be measured."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            _sync(device)
        total_us = sum(getattr(e, "self_device_time_total", 0.0) or 0.0 for e in prof.key_averages())
        return total_us / 1e6 if total_us > 0 else None
    except Exception as exc:  # profiler unavailable or changed: the planner models the utilisation
        print(f"  (no utilisation: {type(exc).__name__}: {exc})")
        return None


def measure(shape: Shape, device: torch.device, scan_impl: str, batch_cap: int | None = None) -> dict:
    """One shape's entry of the calibration file (halving the batch until one step fits)."""
    batch = min(shape.batch, batch_cap or shape.batch)
    while True:
        step = None
        try:
            step = build_step(shape, batch, device, scan_impl)
            t0 = time.perf_counter()
            step()  # warm-up: kernels compiled, allocator and optimizer state filled
            _sync(device)
            warm = time.perf_counter() - t0
            if device.type == "cuda":
                static = torch.cuda.memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            else:
                static = _peak_rss_gib()
            times = []
            for _ in range(3 if warm < 2.0 else 1):
                t0 = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - t0)
            wall = sorted(times)[len(times) // 2]
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else _peak_rss_gib()
            busy = busy_seconds(step, device) if warm < 2.0 else None
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
        finally:
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"shape": shape.name, "pattern": shape.pattern, "frontend": shape.frontend, "tokens": shape.tokens,
            "attention_impl": shape.attention_impl, "precision": shape.precision if device.type == "cuda" else "fp32",
            "scan_impl": scan_impl if "M" in shape.pattern else "none", "d_model": shape.d_model,
            "d_state": shape.d_state, "batch": batch, "step_s": round(wall, 6), "peak_gib": round(max(peak, 1e-6), 4),
            "static_gib": round(min(static, peak), 4),
            "utilisation": None if busy is None else round(min(1.0, busy / wall), 4)}


def calibrate(device: torch.device, budget_s: float, grid: str = "full", datasets: list[str] | None = None,
              scan_impls: tuple[str, ...] = ("auto",), batch_cap: int | None = None,
              log=print, on_entry=None) -> list[dict]:
    """Entries for the grid's shapes, longest first, until budget_s is spent; on_entry(entries)
    after each (the file is rewritten each time, so a session cut short keeps what it measured)."""
    deadline = time.monotonic() + budget_s
    entries: list[dict] = []
    impls = list(dict.fromkeys(resolve_scan_impl(i, device) for i in scan_impls))
    for shape in grid_shapes(grid, datasets):
        for impl in (impls if "M" in shape.pattern else impls[:1]):
            if time.monotonic() > deadline:
                log(f"| {shape.name} [{impl}] | skipped (time budget) | | | |")
                continue
            try:
                e = measure(shape, device, impl, batch_cap)
            except Exception as exc:  # one failing shape must not hide the others; it stays modelled
                log(f"| {shape.name} [{impl}] | error: {type(exc).__name__}: {str(exc).splitlines()[0][:100]} | | | |")
                continue
            entries.append(e)
            if on_entry:
                on_entry(entries)
            util = "-" if e["utilisation"] is None else f"{e['utilisation']:.0%}"
            log(f"| {shape.name} @ {e['tokens']} x {e['batch']} [{e['scan_impl']}] | {e['step_s'] * 1000:.1f} ms | "
                f"{e['peak_gib']:.2f} GiB | {e['static_gib']:.2f} GiB | {util} |")
    return entries


def device_header(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory / 2**30
    else:
        name, memory = "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"format": FORMAT, "gpu": name, "memory_gb": round(memory, 1),
            "auto_scan_impl": resolve_scan_impl("auto", device), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def default_path(device: torch.device) -> Path:
    return CALIBRATION_DIR / f"{gpu_slug(device_header(device)['gpu'])}.json"


def write_calibration(path: Path, header: dict, **sections: list) -> None:
    """Write header + sections, keeping the file's other sections when it is the same GPU's."""
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    keep = {k: v for k, v in old.items() if k in ("steps", "packing")} if old.get("gpu") == header["gpu"] else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**header, **keep, **sections}, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=90.0)
    ap.add_argument("--grid", default="full")
    ap.add_argument("--datasets", default="", help="comma-separated subset of the grid's datasets")
    ap.add_argument("--scan-impls", default="auto", help="comma-separated model.scan_impl values to measure")
    ap.add_argument("--batch-cap", type=int, default=None, help="measure at most this many clips per step")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="", help="calibration file (default benchmarks/calibration/<gpu>.json)")
    args = ap.parse_args(argv)
    device = usable_device(args.device, "calibrate")
    if device is None:
        return 1
    if device.type == "cpu":
        torch.set_num_threads(1)
    header = device_header(device)
    print(f"# calibrate ({header['date']}): {header['gpu']}, {header['memory_gb']} GiB, torch {header['torch']}, "
          f"scan_impl=auto runs {header['auto_scan_impl']}\n")
    print("| shape @ tokens x batch [scan] | step | peak | static | GPU busy |\n|---|---|---|---|---|")
    path = Path(args.out) if args.out else default_path(device)
    header = {**header, "command": "benchmarks/calibrate.py " + " ".join(argv or sys.argv[1:])}
    entries = calibrate(device, args.budget_s, args.grid, [d for d in args.datasets.split(",") if d] or None,
                        tuple(args.scan_impls.split(",")), args.batch_cap,
                        log=lambda line: print(line, flush=True),
                        on_entry=lambda entries: write_calibration(path, header, steps=entries))
    print(f"\n{len(entries)} shapes measured; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
