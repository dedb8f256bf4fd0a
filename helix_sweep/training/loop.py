"""The training loop of one trial: `run_training(spec, reporter)`. Knows nothing of Ray or MLflow.

The reporter (helix_sweep.sweep.worker for Ray Train; tests may pass their own; the seam's types
are in helix_sweep.training.reporting) loads the latest checkpoint, commits new ones, and receives
each epoch's result only together with a committed checkpoint, so a resumed trial never re-logs an
epoch. The data order is a permutation seeded by (seed, epoch), so a resume only needs the epoch
and the step within it; augmentation draws from one generator whose state is checkpointed. Test
faults (train.inject) come in through helix_sweep.training.faults. In a multi-worker (DDP) trial
the ranks decide each step together and then average gradients (helix_sweep.training.distributed).

Legend: B batch, T samples, C classes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helix_sweep.config import AugmentSettings, TrialSpec
from helix_sweep.data import open_task
from helix_sweep.data.augment import augment_and_mix
from helix_sweep.models import build_classifier_from, resolve_scan_impl
from helix_sweep.training.checkpoint import Progress, rng_state, set_rng_state
from helix_sweep.training.distributed import (
    StepFlags, agree, all_gather_states, average_gradients, broadcast_parameters,
)
from helix_sweep.training.faults import Faults
from helix_sweep.training.reporting import EpochResult, Reporter, TrialReport

log = logging.getLogger(__name__)
NO_FAULTS = Faults()


class TrialStopped(Exception):
    """Ends a trial cleanly with a status other than finished (diverged, oom)."""

    def __init__(self, status: str, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


@dataclass
class Setup:
    """What a trial builds before its first step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    steps_per_epoch: int
    micro_batch: int
    world_size: int = 1  # DDP ranks; 1 issues no collective (helix_sweep.training.distributed)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # precision -> autocast dtype


def resolve_precision(precision: str, device: torch.device, planned: str = "") -> str:
    """The precision a trial trains in: fp32 on CPU; on a GPU an explicit train.precision, else (auto) the
    plan's choice (spec.budget.precision: fp32 where the trial fits in fp32, fp16 where memory needs it),
    fp16 when the trial was not planned (a spec built by hand)."""
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return planned or "fp16"
    return precision


def amp_dtype_for(precision: str, device: torch.device, planned: str = "") -> Optional[torch.dtype]:
    """The autocast dtype of resolve_precision (None: fp32, no autocast); fp16 runs with a grad scaler."""
    return AMP_DTYPES[resolve_precision(precision, device, planned)]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on A_log, D (marked _no_weight_decay, as mamba_ssm does), biases and norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if getattr(p, "_no_weight_decay", False) or p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of the epoch's shuffled order; equal-length shares (DDP needs them)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = n // world_size
    return perm[rank * per_rank:(rank + 1) * per_rank]


def evaluate(model, clipset, device, batch: int, amp_dtype, num_classes: int) -> dict:
    model.eval()
    loss_sum, correct, confusion = 0.0, 0, np.zeros((num_classes, num_classes), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(clipset), batch):
            x, y = clipset.get_batch(range(start, min(start + batch, len(clipset))))
            x, y = x.to(device), y.to(device)
            with _autocast(device, amp_dtype):
                logits = model(x)  # (B, C)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            pred = logits.argmax(-1)
            correct += (pred == y).sum().item()
            np.add.at(confusion, (y.cpu().numpy(), pred.cpu().numpy()), 1)
    model.train()
    n = max(len(clipset), 1)
    return {"loss": loss_sum / n, "acc": correct / n, "confusion": confusion}


def _autocast(device: torch.device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def micro_batch(spec: TrialSpec, device: torch.device, per_rank_batch: int) -> int:
    """Clips per micro-step: on a GPU the one planned at grid expansion (spec.budget: train.micro_batch
    if set, else the largest that fits the GPU), elsewhere train.micro_batch, or the whole batch."""
    planned = spec.budget.micro_batch if device.type == "cuda" else 0
    return min(planned or spec.train.micro_batch or per_rank_batch, per_rank_batch)


def build(spec: TrialSpec, num_classes: int, n_train: int, world_size: int) -> Setup:
    device = pick_device()
    model = build_classifier_from(spec.model, spec.pattern, spec.frontend, num_classes,
                                  spec.pool_tokens).to(device)
    scan_impl(spec, device)  # an explicit scan_impl that cannot run here fails before the first step
    if world_size > 1:  # gradients are averaged after each step's agreed decision (train_step), not by DDP
        broadcast_parameters(model, world_size, device)
    t = spec.train
    per_rank_batch = t.batch_size // world_size
    if per_rank_batch < 1:
        raise ValueError(f"train.batch_size={t.batch_size} is smaller than the {world_size} DDP workers")
    micro = micro_batch(spec, device, per_rank_batch)
    steps_per_epoch = max((n_train // world_size) // per_rank_batch, 1)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr)
    # the cosine schedule spans all t.epochs, also when training stops earlier (train.stop_after_epochs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=t.epochs * steps_per_epoch, eta_min=t.min_lr)
    amp_dtype = amp_dtype_for(t.precision, device, spec.budget.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")
    return Setup(model, optimizer, scheduler, scaler, device, amp_dtype, steps_per_epoch, micro, world_size)


def scan_impl(spec: TrialSpec, device: torch.device) -> str:
    """The selective scan this trial's Mamba layers run on `device` (cached per process), or "none"."""
    return resolve_scan_impl(spec.model.scan_impl, device) if "M" in spec.pattern else "none"


def trial_report(spec: TrialSpec, setup: Setup, task) -> TrialReport:
    core = setup.model.module if hasattr(setup.model, "module") else setup.model
    report = core.param_report()
    return TrialReport(
        n_params=report["total"], n_params_per_layer=report["layers"], d_ffn=report["d_ffn"],
        tokens_per_clip=core.num_tokens(task.clip_samples), micro_batch=setup.micro_batch,
        grad_accum=(spec.train.batch_size // max(1, _world(setup))) // setup.micro_batch,
        steps_per_epoch=setup.steps_per_epoch, device=str(setup.device),
        precision=next(name for name, dtype in AMP_DTYPES.items() if dtype == setup.amp_dtype),
        scan_impl=scan_impl(spec, setup.device),
        label_names=list(task.label_names), task=dict(task.info),
    )


def _world(setup: Setup) -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class StepResult(NamedTuple):
    loss_sum: float  # NaN when the step was skipped (a non-finite loss on some rank)
    correct: float
    checkpoint: bool  # the ranks agreed to write a mid-epoch checkpoint after this step


def train_step(setup: Setup, spec: TrialSpec, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
               num_classes: int, aug: AugmentSettings, global_step: int,
               faults: Faults = NO_FAULTS, checkpoint_at: float = math.inf) -> StepResult:
    """One optimizer step over a batch, in micro-batches. What happens to it is decided once for all
    ranks (helix_sweep.training.distributed.agree) between the backward passes and the optimizer:
    skipped, checkpointed after it (some rank's clock passed checkpoint_at), or stopped with CUDA's
    out-of-memory error raised on every rank."""
    model, opt, device = setup.model, setup.optimizer, setup.device
    x, target = augment_and_mix(x, y, aug, num_classes, gen)  # (B, T), soft target (B, C)
    x, y, target = x.to(device), y.to(device), target.to(device)
    opt.zero_grad(set_to_none=True)
    loss_sum, correct = 0.0, 0.0
    nonfinite, oom = False, ""
    n = x.shape[0]
    try:
        for start in range(0, n, setup.micro_batch):
            xs, ts = x[start:start + setup.micro_batch], target[start:start + setup.micro_batch]
            faults.before_micro_step(global_step)
            with _autocast(device, setup.amp_dtype):
                logits = model(xs)  # (b, C)
            loss = torch.sum(-ts * F.log_softmax(logits.float(), dim=-1), dim=-1).sum() / n  # mean over the batch
            loss = faults.loss(loss, global_step)
            if not torch.isfinite(loss):
                nonfinite = True
                break
            setup.scaler.scale(loss).backward()
            loss_sum += loss.item() * n
            correct += (logits.argmax(-1) == y[start:start + setup.micro_batch]).sum().item()
    except torch.cuda.OutOfMemoryError as exc:
        oom = str(exc)  # the message only: the exception's frames would keep the step's tensors alive
    agreed = agree(StepFlags(nonfinite, bool(oom), time.monotonic() >= checkpoint_at), setup.world_size, device)
    if agreed.oom or agreed.nonfinite:
        opt.zero_grad(set_to_none=True)
        if agreed.oom:
            raise torch.cuda.OutOfMemoryError(oom or _oom_elsewhere(setup))
        return StepResult(float("nan"), 0.0, False)
    average_gradients(model.parameters(), setup.world_size, device)
    setup.scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
    setup.scaler.step(opt)
    setup.scaler.update()
    setup.scheduler.step()
    return StepResult(loss_sum, correct, agreed.checkpoint)


def _oom_elsewhere(setup: Setup) -> str:
    return f"CUDA out of memory on another of the {setup.world_size} ranks (its log has the details)"


def run_training(spec: TrialSpec, reporter: Reporter) -> Progress:
    t = spec.train
    torch.manual_seed(t.seed)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    task = open_task(spec.data_root, spec.dataset, fold=spec.fold, seed=t.seed,
                     val_fraction=t.val_fraction, **spec.task_options)
    rank, world = reporter.rank, reporter.world_size
    setup = build(spec, task.num_classes, len(task.train), world)
    gen = torch.Generator().manual_seed(t.seed * 7919 + rank)  # augmentation stream of this rank
    progress = Progress()
    state = reporter.load()
    if state is not None:
        _check_architecture(state, spec)
        core = setup.model.module if hasattr(setup.model, "module") else setup.model
        core.load_state_dict(state["model"])
        setup.optimizer.load_state_dict(state["optimizer"])
        setup.scheduler.load_state_dict(state["scheduler"])
        setup.scaler.load_state_dict(state["scaler"])
        gen.set_state(state["augment_rng"][rank] if rank < len(state["augment_rng"]) else gen.get_state())
        set_rng_state(state["rng"])
        progress = Progress.from_state_dict(state["progress"])
        log.info("%s: resuming at epoch %d step %d", spec.key, progress.epoch, progress.step_in_epoch)
    trial = trial_report(spec, setup, task)
    progress.run_id = reporter.start(progress, trial)
    if progress.status != "running":  # the final checkpoint exists: finish at once, idempotently
        reporter.finish(progress, trial)
        return progress
    faults = Faults(t.inject, spec.key, rank)
    try:
        _train(spec, setup, task, gen, progress, reporter, faults)
    except TrialStopped as stop:
        progress.status = stop.status
        trial.stop_reason = stop.detail
        log.warning("%s stopped: %s", spec.key, stop)
    except torch.cuda.OutOfMemoryError as exc:
        progress.status = "oom"
        trial.stop_reason = (f"out of memory at {trial.tokens_per_clip} tokens/clip, "
                             f"micro-batch {setup.micro_batch}: {str(exc).splitlines()[0]}")
        log.error("%s: %s", spec.key, trial.stop_reason)
    if progress.status in ("diverged", "oom"):  # terminal: checkpointed, so a relaunch reports it, never retrains
        progress.stop_reason = trial.stop_reason
        reporter.commit(_snapshot(spec, setup, gen, progress, world), None, progress)
    faults.before_finish()
    reporter.finish(progress, trial)
    return progress


def _check_architecture(state: dict, spec: TrialSpec) -> None:
    """A checkpoint restores its own architecture; a config that disagrees is an error, not a guess."""
    saved = state.get("arch", {})
    now = _arch(spec)
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"{spec.key}: checkpoint architecture differs from the config: "
                         + ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items()))


def _arch(spec: TrialSpec) -> dict:
    m = spec.model
    return {"pattern": spec.pattern, "frontend": spec.frontend, "d_model": m.d_model, "d_state": m.d_state,
            "d_conv": m.d_conv, "expand": m.expand, "num_heads": m.num_heads, "pool_tokens": spec.pool_tokens,
            "pos_encoding": m.pos_encoding}


def _snapshot(spec: TrialSpec, setup: Setup, gen: torch.Generator, progress: Progress, world: int) -> dict:
    core = setup.model.module if hasattr(setup.model, "module") else setup.model
    states = all_gather_states(gen.get_state(), world, setup.device)  # every rank's stream, into rank 0's checkpoint
    return {
        "model": core.state_dict(), "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(), "scaler": setup.scaler.state_dict(),
        "augment_rng": states, "rng": rng_state(), "progress": progress.state_dict(), "arch": _arch(spec),
    }


def _train(spec, setup: Setup, task, gen, progress: Progress, reporter: Reporter, faults: Faults) -> None:
    t = spec.train
    world, rank = reporter.world_size, reporter.rank
    per_rank_batch = t.batch_size // world
    last_ckpt = time.monotonic()
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    # the scheduler spans t.epochs (build); training stops after t.stop_epoch of them
    while progress.epoch < t.stop_epoch:
        order = epoch_order(len(task.train), t.seed, progress.epoch, rank, world)
        started = time.monotonic()
        while progress.step_in_epoch < setup.steps_per_epoch:
            i = progress.step_in_epoch
            x, y = task.train.get_batch(order[i * per_rank_batch:(i + 1) * per_rank_batch].tolist())
            faults.before_step(progress.global_step)
            loss_sum, correct, checkpoint = train_step(setup, spec, x, y, gen, task.num_classes, t.augment,
                                                       progress.global_step, faults,
                                                       checkpoint_at=last_ckpt + 60.0 * t.checkpoint_minutes)
            progress.step_in_epoch += 1
            progress.global_step += 1
            if math.isnan(loss_sum):
                progress.nonfinite_in_row += 1
                progress.nonfinite_total += 1
                if progress.nonfinite_in_row >= t.max_nonfinite_steps:
                    raise TrialStopped("diverged", f"{progress.nonfinite_in_row} non-finite losses in a row "
                                       f"at step {progress.global_step}")
                setup.scheduler.step()  # keep the LR schedule on the planned steps
                continue
            progress.nonfinite_in_row = 0
            progress.epoch_loss_sum += loss_sum
            progress.epoch_correct += correct
            progress.epoch_seen += x.shape[0]
            if checkpoint and progress.step_in_epoch < setup.steps_per_epoch:  # decided by all ranks
                progress.epoch_seconds += time.monotonic() - started
                started = time.monotonic()
                reporter.commit(_snapshot(spec, setup, gen, progress, world), None, progress)
                last_ckpt = time.monotonic()
        progress.epoch_seconds += time.monotonic() - started
        epoch = _end_epoch_agreed(spec, setup, task, progress)
        if progress.epoch >= t.stop_epoch:
            # the last epoch's report is the final one: a scheduler that stops trials at max_t
            # (ASHA) then stops a finished trial, never one between its last epoch and its end
            progress.status = "finished"
        reporter.commit(_snapshot(spec, setup, gen, progress, world), epoch, progress)
        last_ckpt = time.monotonic()
    if progress.status == "running":  # resumed with every epoch already done (stop epoch lowered)
        progress.status = "finished"
        reporter.commit(_snapshot(spec, setup, gen, progress, world), None, progress)


def _end_epoch_agreed(spec, setup: Setup, task, progress: Progress) -> EpochResult:
    """_end_epoch, with its out-of-memory error (evaluation runs whole batches) raised on every rank
    or on none: a rank that stopped alone would leave the others in the checkpoint's collective."""
    oom = ""
    try:
        epoch = _end_epoch(spec, setup, task, progress)
    except torch.cuda.OutOfMemoryError as exc:
        oom = str(exc)
    if agree(StepFlags(oom=bool(oom)), setup.world_size, setup.device).oom:
        raise torch.cuda.OutOfMemoryError(oom or _oom_elsewhere(setup))
    return epoch


def _end_epoch(spec, setup: Setup, task, progress: Progress) -> EpochResult:
    evaluated = evaluate(setup.model, task.test, setup.device, spec.train.batch_size, setup.amp_dtype,
                         task.num_classes)
    progress.epoch += 1
    seen = max(progress.epoch_seen, 1)
    metrics = {
        "epoch": progress.epoch,
        "train_loss": progress.epoch_loss_sum / seen, "train_acc": progress.epoch_correct / seen,
        "test_loss": evaluated["loss"], "test_acc": evaluated["acc"],
        "lr": setup.optimizer.param_groups[0]["lr"], "epoch_seconds": progress.epoch_seconds,
        "samples_per_s": progress.epoch_seen / max(progress.epoch_seconds, 1e-9),
        "peak_mem_mb": _peak_mem_mb(setup.device), "nonfinite_steps": progress.nonfinite_total,
        "_ts": int(time.time() * 1000),  # when the epoch ended: a re-delivered log keeps its timestamp
    }
    is_best = evaluated["acc"] > progress.best_test_acc
    if is_best:
        progress.best_test_acc, progress.best_epoch = evaluated["acc"], progress.epoch
    if task.val is not None:
        val = evaluate(setup.model, task.val, setup.device, spec.train.batch_size, setup.amp_dtype,
                       task.num_classes)
        metrics.update(val_loss=val["loss"], val_acc=val["acc"])
        if val["acc"] > progress.best_val_acc:
            progress.best_val_acc, progress.test_acc_at_best_val = val["acc"], evaluated["acc"]
        metrics["test_acc_at_best_val"] = progress.test_acc_at_best_val
    metrics.update(best_test_acc=progress.best_test_acc, best_epoch=progress.best_epoch)
    progress.history.append(dict(metrics))
    progress.step_in_epoch = 0
    progress.epoch_loss_sum = progress.epoch_correct = 0.0
    progress.epoch_seen, progress.epoch_seconds = 0, 0.0
    return EpochResult(metrics, is_best, evaluated["confusion"].tolist() if is_best else None)


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
