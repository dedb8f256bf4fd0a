"""Measured figures for the planner (a calibration file), and packing short trials onto shares of a GPU.

Pure functions over the cost model (helix_sweep.training.budget); no Ray, no torch tensors.

- Calibration: a JSON file written on a GPU by benchmarks/packing.py (one per GPU model, in
  benchmarks/calibration/<gpu>.json), with, per trial shape (pattern, frontend, tokens, attention
  impl, precision, scan impl, d_model, d_state), the measured seconds of one optimizer step at a batch, its peak and
  static memory, and the share of the step the GPU is busy (kernel time / wall time); and, for a
  few shapes, the clips/s of k trials packed on the one GPU. `step_cost` uses the measured figures
  where the file has the trial's shape (source "measured"), the cost model elsewhere ("modelled").
- Packing: `gpu_fraction` gives a trial 1/8, 1/4, 1/2 or a whole GPU: the smallest share whose
  memory holds the trial's peak x headroom and whose time slice holds its GPU utilisation, with no
  more trials on a GPU than the node's CPUs can serve. DDP trials keep whole GPUs.
- `packed_slowdown`: how much longer a trial takes when its GPU is shared by 1/fraction such trials;
  measured (k / clips-per-s ratio at k) where the file has it, else modelled.

Ray places the shares: a Train worker asks for {"GPU": fraction} (helix_sweep.sweep.driver).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from helix_sweep.config import TrialBudget, TrialSpec, gpus_per_worker
from helix_sweep.training import budget

FRACTIONS = (0.125, 0.25, 0.5, 1.0)  # the shares a packed trial can get
MAX_TRIALS_PER_GPU = 8
# Assumed until measured: a packed trial runs this much slower than alone, on top of waiting for
# the GPU when the sharers' busy time adds up past one (time slicing between CUDA contexts, host
# contention). benchmarks/packing.py measures the real figure (the ratio of packed clips/s).
PACKING_OVERHEAD = 0.25
CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "calibration"
FORMAT = 1


def gpu_slug(name: str) -> str:
    """A GPU model's file name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


# ----------------------------------------------------------------------------- the calibration file


@dataclass(frozen=True)
class Measured:
    """One optimizer step of one trial shape, measured: a single micro-step of `batch` clips."""

    batch: int  # clips in the measured step
    step_s: float  # wall seconds of the step (forward, backward, optimizer; batch on the device)
    peak_gib: float  # peak memory allocated during the step (torch.cuda.max_memory_allocated)
    static_gib: float  # allocated before it: weights, gradients, optimizer state
    utilisation: Optional[float] = None  # share of the step the GPU was busy; None: not measured


@dataclass(frozen=True)
class Calibration:
    """A calibration file: measured steps per shape, packed throughput per (shape, k)."""

    path: str
    gpu: str  # device name as torch reports it
    memory_gb: float
    auto_scan_impl: str  # what model.scan_impl=auto ran there
    steps: dict  # shape key -> Measured
    packing: dict  # (pattern, frontend, tokens) -> {k: clips/s ratio to k = 1}

    def scan_impl(self, requested: str, pattern: str) -> str:
        if "M" not in pattern:
            return "none"
        return self.auto_scan_impl if requested == "auto" else requested

    def lookup(self, t: budget.PlanTrial, scan_impl: str = "auto") -> Optional[Measured]:
        return self.steps.get(shape_key(t.pattern, t.frontend, t.tokens, t.attention_impl, t.precision,
                                        self.scan_impl(scan_impl, t.pattern), t.d_model, t.d_state))

    def packed_ratio(self, t: budget.PlanTrial, k: int) -> Optional[float]:
        return self.packing.get((t.pattern, t.frontend, t.tokens), {}).get(k)


def shape_key(pattern: str, frontend: str, tokens: int, attention_impl: str, precision: str,
              scan_impl: str, d_model: int = 256, d_state: int = 32) -> tuple:
    # attention_impl only matters where there is attention, the scan only where there is Mamba
    return (pattern, frontend, int(tokens), attention_impl if "A" in pattern else "-", precision,
            scan_impl if "M" in pattern else "none", int(d_model), int(d_state))


class CalibrationError(ValueError):
    """A calibration file that cannot be read; the message names the file and the entry."""


def resolve_calibration_path(setting: str, gpu: str) -> Optional[Path]:
    """plan.calibration: "none" -> no file; "auto" -> benchmarks/calibration/<gpu>.json when it
    exists; else the named file, which must exist."""
    setting = str(setting).strip()
    if setting.lower() in ("none", "null", ""):
        return None
    if setting.lower() == "auto":
        path = CALIBRATION_DIR / f"{gpu_slug(gpu)}.json"
        return path if path.is_file() else None
    path = Path(setting).expanduser()
    if not path.is_file():
        raise CalibrationError(f"plan.calibration={setting}: no such file")
    return path


def load_calibration(setting: Any = "auto", gpu: str = "NVIDIA L40S") -> Optional[Calibration]:
    """The calibration plan.calibration names (None when there is none to read)."""
    path = resolve_calibration_path(setting, gpu) if not isinstance(setting, Path) else setting
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable JSON calibration file: {exc}") from None
    return parse_calibration(data, str(path))


def parse_calibration(data: dict, path: str = "<calibration>") -> Calibration:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(f"{path}: expected a mapping with format: {FORMAT}")
    steps: dict = {}
    for i, e in enumerate(data.get("steps") or []):
        where = f"{path}: steps[{i}]"
        try:
            m = Measured(int(e["batch"]), float(e["step_s"]), float(e["peak_gib"]), float(e.get("static_gib", 0.0)),
                         None if e.get("utilisation") is None else float(e["utilisation"]))
            key = shape_key(e["pattern"], e["frontend"], e["tokens"], e.get("attention_impl", "naive"),
                            e.get("precision", "fp16"), e.get("scan_impl", "none"), e.get("d_model", 256),
                            e.get("d_state", 32))
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"{where}: bad or missing field ({exc!r}); need pattern, frontend, tokens, "
                                   f"batch, step_s, peak_gib") from None
        if m.batch < 1 or m.step_s <= 0 or m.peak_gib <= 0 or not 0 <= m.static_gib <= m.peak_gib \
                or (m.utilisation is not None and not 0 <= m.utilisation <= 1):
            raise CalibrationError(f"{where}: out of range: {e}")
        steps[key] = m
    packing: dict = {}
    for i, e in enumerate(data.get("packing") or []):
        try:
            shape = (e["pattern"], e["frontend"], int(e["tokens"]))
            packing.setdefault(shape, {})[int(e["k"])] = float(e["ratio"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"{path}: packing[{i}]: bad or missing field ({exc!r}); need pattern, "
                                   f"frontend, tokens, k, ratio") from None
    try:
        return Calibration(path, str(data["gpu"]), float(data["memory_gb"]), str(data.get("auto_scan_impl", "pure")),
                           steps, packing)
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(f"{path}: bad or missing field ({exc!r}); need gpu, memory_gb") from None


# ----------------------------------------------------------------------------- a trial's step


@dataclass(frozen=True)
class StepCost:
    """One optimizer step of one of the trial's workers."""

    seconds: float
    peak_bytes: float  # peak GPU memory of the worker, CUDA context and allocator slack included
    utilisation: float  # share of the step the GPU is busy
    source: str  # "measured" (the calibration file) or "modelled" (the cost model)


def step_cost(trial: Any, micro_batch: int, gpu: budget.Gpu = budget.L40S,
              calibration: Optional[Calibration] = None, scan_impl: str = "auto") -> StepCost:
    """Seconds, peak memory and utilisation of one step at `micro_batch` clips per micro-step.

    Measured figures are scaled from the measured batch to the trial's: time linearly in clips
    (an upper bound for launch-bound small batches; the calibration measures at the trial's
    per-worker batch where it fits, so mostly it is exact), memory as the static part plus the
    activations in proportion to the micro-batch."""
    t = budget.as_trial(trial)
    clips = t.batch_size // t.workers
    measured = calibration.lookup(t, scan_impl) if calibration else None
    if measured is not None:
        act = (measured.peak_gib - measured.static_gib) * micro_batch / measured.batch
        util = measured.utilisation if measured.utilisation is not None else _modelled_utilisation(t, micro_batch, gpu)
        return StepCost(measured.step_s * clips / measured.batch,
                        (measured.static_gib + act + gpu.reserve_gb) * budget.GIB, util, "measured")
    return StepCost(budget.step_seconds(t, micro_batch, gpu), budget.training_memory_bytes(t, micro_batch, gpu),
                    _modelled_utilisation(t, micro_batch, gpu), "modelled")


def _modelled_utilisation(t: budget.PlanTrial, micro_batch: int, gpu: budget.Gpu) -> float:
    """The cost model's compute time over its step time: the fixed per-step and per-micro-step costs
    (data, augmentation, optimizer, kernel launches) leave the GPU idle."""
    idle = replace(gpu, step_overhead_s=0.0, micro_step_overhead_s=0.0)
    return min(1.0, budget.step_seconds(t, micro_batch, idle) / budget.step_seconds(t, micro_batch, gpu))


def trial_gpu_hours(trial: Any, cost: StepCost, gpu: budget.Gpu = budget.L40S) -> float:
    """GPU-hours of the whole trial on whole GPUs from its step cost: epochs x (training steps + an
    evaluation pass). A measured step's evaluation is taken as a third of its time per clip
    (forward only); a modelled one is the cost model's estimate_gpu_hours."""
    t = budget.as_trial(trial)
    if cost.source == "modelled":
        return budget.estimate_gpu_hours(t, gpu)
    steps = math.ceil(t.train_clips / t.batch_size)
    per_clip = cost.seconds / (t.batch_size / t.workers)
    evals = per_clip / 3.0 * t.eval_clips / t.workers
    return t.epochs * (steps * cost.seconds + evals) * t.workers / 3600.0


# ----------------------------------------------------------------------------- packing


def max_trials_per_gpu(cpus_per_gpu: float, cpus_per_worker: float) -> int:
    """Packed trials one GPU can take: as many as its node's CPUs serve, at most 8."""
    return max(1, min(MAX_TRIALS_PER_GPU, int(cpus_per_gpu / cpus_per_worker + 1e-9)))


def share_for(peak_bytes: float, utilisation: float, gpu_memory_gb: float, max_trials: int = MAX_TRIALS_PER_GPU,
              headroom: float = 1.5) -> float:
    """The smallest share of 1/8, 1/4, 1/2, 1 that holds peak x headroom of the GPU's memory and the
    utilisation (so the sharers' busy time fits the GPU's), and no more than max_trials per GPU."""
    need = max(peak_bytes * headroom / (gpu_memory_gb * budget.GIB), utilisation, 1.0 / max_trials)
    return next((f for f in FRACTIONS if need <= f + 1e-9), 1.0)


def gpu_fraction(trial: Any, gpu: budget.Gpu = budget.L40S, calibration: Optional[Calibration] = None,
                 max_trials: int = MAX_TRIALS_PER_GPU, headroom: float = 1.5, scan_impl: str = "auto",
                 micro_batch: Optional[int] = None) -> float:
    """The share of a GPU the trial's (single) worker asks for: 1 for DDP trials and trials that
    do not fit (they keep whole GPUs), else share_for its step's peak memory and utilisation."""
    t = budget.as_trial(trial)
    if t.workers > 1:
        return 1.0
    if micro_batch is None:
        try:
            micro_batch, _ = budget.choose_micro_batch(t, gpu.memory_gb, gpu=gpu)
        except budget.InfeasibleTrial:
            return 1.0
    cost = step_cost(t, micro_batch, gpu, calibration, scan_impl)
    return share_for(cost.peak_bytes, cost.utilisation, gpu.memory_gb, max_trials, headroom)


def packed_slowdown(trial: Any, fraction: float, cost: StepCost, calibration: Optional[Calibration] = None) -> float:
    """Wall time packed / wall time alone, when 1/fraction such trials share the GPU: measured as
    k / (clips/s of k packed trials over clips/s of one) where the file has this shape at k, else
    modelled: the sharers queue for the GPU once their busy time passes one (k x utilisation), plus
    PACKING_OVERHEAD."""
    if fraction >= 1.0:
        return 1.0
    k = max(1, round(1.0 / fraction))
    ratio = calibration.packed_ratio(budget.as_trial(trial), k) if calibration else None
    if ratio:
        return max(1.0, k / ratio)
    return max(1.0, k * cost.utilisation) * (1.0 + PACKING_OVERHEAD)


@dataclass(frozen=True)
class TrialPacking:
    """The plan's figures for one trial with measured or modelled steps, alone and packed."""

    key: str
    source: str  # measured | modelled
    gpu_hours: float  # on whole GPUs (summed over workers); 0 when oom
    fraction: float  # GPU share per worker when packed
    packed_hours: float  # wall hours when packed (per worker, all in parallel)
    utilisation: float
    peak_gib: float
    workers: int


def plan_packing(trial: Any, plan: budget.TrialPlan, gpu: budget.Gpu = budget.L40S,
                 calibration: Optional[Calibration] = None, max_trials: int = MAX_TRIALS_PER_GPU,
                 headroom: float = 1.5, scan_impl: str = "auto") -> TrialPacking:
    """A TrialPlan's trial with the calibration's figures where measured and its packed share."""
    t = budget.as_trial(trial)
    if plan.feasibility == "oom":
        return TrialPacking(t.key, "modelled", 0.0, 1.0, 0.0, 0.0, 0.0, t.workers)
    cost = step_cost(t, plan.micro_batch, gpu, calibration, scan_impl)
    hours = trial_gpu_hours(t, cost, gpu)
    fraction = gpu_fraction(t, gpu, calibration, max_trials, headroom, scan_impl, plan.micro_batch)
    wall = hours / t.workers * packed_slowdown(t, fraction, cost, calibration)
    return TrialPacking(t.key, cost.source, hours, fraction, wall, cost.utilisation, cost.peak_bytes / budget.GIB,
                        t.workers)


def format_fraction(f: float) -> str:
    """1 -> "1", 0.25 -> "1/4", 0.3 -> "0.3"."""
    if f >= 1 or f <= 0:
        return f"{f:g}"
    k = round(1 / f)
    return f"1/{k}" if abs(1 / k - f) < 1e-9 else f"{f:g}"


def planned_fraction(spec: TrialSpec, planned: TrialBudget, calibration: Optional[Calibration] = None,
                     headroom: float = 1.5) -> float:
    """The GPUs per worker a grid trial asks Ray for on a GPU cluster: resources.gpus_per_worker when
    it is a number, else (auto) gpu_fraction on one GPU of resources.gpu_memory_gb, at the trial's
    planned micro-batch, with at most cpus_per_gpu / cpus_per_worker trials per GPU. A trial the plan
    finds infeasible (run only when forced) keeps a whole GPU."""
    r = spec.resources
    fixed = gpus_per_worker(r, f"trial {spec.key}: resources")
    if fixed is not None:
        return fixed
    if planned.feasibility == "oom" or planned.planned_oom:
        return 1.0
    gpu = replace(budget.L40S, memory_gb=r.gpu_memory_gb)
    spec = replace(spec, budget=planned)  # its planned precision picks the measured figures
    return gpu_fraction(spec, gpu, calibration, max_trials_per_gpu(r.cpus_per_gpu, r.cpus_per_worker), headroom,
                        spec.model.scan_impl, planned.micro_batch or None)
