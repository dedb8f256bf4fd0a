"""The MLflow schema of a sweep: every tag, param, metric and run name that a writer logs and the
report reads, the values the `kind` and `status` tags take, and the fold aggregate (mean ± std).

Plain constants and pure helpers, no MLflow or Ray import: the report's tables import this cheaply.

One experiment per sweep. In it:
- a parent run per (dataset, variant), named `<dataset>/<variant>`, tags kind=parent, dataset,
  variant, folds_planned ("1,2,3,4,5" or "split"), folds_done; metrics the fold aggregates
  (step = number of finished folds);
- a trial run per trial, named after its trial key `<dataset>/<variant>/fold<k>` (or `/split`),
  nested under its parent (tag mlflow.parentRunId), tags kind=trial, trial_key, dataset, variant,
  fold, status, resumes, hardware, stop_reason (when it did not finish); params every resolved setting
  that changes a result (`trial_params`: model, train with augment, task options, pooling, the plan's
  verdicts, and from the worker what it resolved: precision, scan_impl, micro-batch, parameter counts);
  tracking_errors (a tag, when MLflow refused a write: skipped and counted);
  packed_oom (a tag, when it ran out of memory on a share of a GPU and was retried on a whole one);
  metrics per epoch with step = epoch (EPOCH_METRICS), then epochs_done and best_test_acc_final.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from typing import Any, Sequence

# Tags
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own: nests a run under another in the UI
KIND = "kind"
TRIAL_KEY = "trial_key"
DATASET = "dataset"
VARIANT = "variant"
FOLD = "fold"
STATUS = "status"
RESUMES = "resumes"  # how many times the trial's workers restarted from a checkpoint
STOP_REASON = "stop_reason"
HARDWARE = "hardware"
PACKED_OOM = "packed_oom"  # why a trial packed on a share of a GPU was retried on a whole GPU
TRACKING_ERRORS = "tracking_errors"  # writes MLflow refused (a rejected value, a full artifact disk), skipped
FOLDS_PLANNED = "folds_planned"  # on a parent: the folds the sweep will run, comma-separated
FOLDS_DONE = "folds_done"  # on a parent: the finished folds its aggregates cover
SAMPLES_PLANNED = "samples_planned"  # on a search's parent: the samples the search runs (its trials)
# MLflow 3's UI opens an experiment on its GenAI trace overview unless the experiment says it holds
# model-training runs; with this experiment tag it opens the runs table.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")

# Values of the kind tag
KIND_TRIAL = "trial"
KIND_PARENT = "parent"

# Values of the status tag: training's Progress.status (running, finished, diverged, oom, failed),
# and three the sweep sets itself: planned_oom (never launched: the plan predicts out of memory under
# the trial's attention_impl), ruled_oom (never launched: a grid rule keeps it out, its reason in
# stop_reason, although the plan says it fits) and stopped (the scheduler ended it early).
RUNNING = "running"
FINISHED = "finished"  # the only status whose numbers count in the aggregates
OOM = "oom"
DIVERGED = "diverged"
FAILED = "failed"
PLANNED_OOM = "planned_oom"
RULED_OOM = "ruled_oom"
NOT_LAUNCHED = (PLANNED_OOM, RULED_OOM)  # the sweep records these without running them
STOPPED = "stopped"
TERMINAL_STATUSES = frozenset({FINISHED, OOM, DIVERGED, FAILED, PLANNED_OOM, RULED_OOM})  # will not run again

# Params the report reads (the rest of a trial's params are its settings, named as in the config)
FRONTEND = "frontend"
TOKENS_PER_CLIP = "tokens_per_clip"
POOL_TOKENS = "pool_tokens"
SCAN_IMPL = "scan_impl"  # the selective scan the trial ran (cuda | triton | pure | none)
SCAN_IMPL_REQUESTED = "scan_impl_requested"  # model.scan_impl as configured (auto, or an explicit one)
ATTENTION_IMPL = "attention_impl"  # model.attention_impl: naive | sdpa
PRECISION = "precision"  # what the trial trained in (fp32 | fp16 | bf16): train.precision resolved
PRECISION_REQUESTED = "precision_requested"  # train.precision as configured (auto, or an explicit one)
NUM_CLASSES = "num_classes"
PLAN_FEASIBILITY = "plan.feasibility"  # the plan's ok | slow | oom under the trial's own attention_impl


def plan_feasibility_name(attention_impl: str) -> str:
    """The param holding the plan's verdict under one attention implementation: plan.feasibility.naive."""
    return f"{PLAN_FEASIBILITY}.{attention_impl}"

# Metrics: per epoch (step = epoch), as training names them
EPOCH_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc", "best_epoch", "lr",
                 "epoch_seconds", "samples_per_s", "peak_mem_mb", "val_loss", "val_acc", "test_acc_at_best_val",
                 "nonfinite_steps")
TEST_ACC = "test_acc"  # logged every epoch: its history says which epochs a run holds
BEST_TEST_ACC = "best_test_acc"
TEST_ACC_AT_BEST_VAL = "test_acc_at_best_val"
BEST_EPOCH = "best_epoch"
# at the end of a trial (step 0)
EPOCHS_DONE = "epochs_done"
BEST_TEST_ACC_FINAL = "best_test_acc_final"
# on a parent (step = finished folds): mean and sample std over finished folds of a trial metric
N_FOLDS_DONE = "n_folds_done"
AGGREGATED = (BEST_TEST_ACC, TEST_ACC_AT_BEST_VAL)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"augment": {"shift": True}} -> {"augment.shift": True}: nested settings as dotted params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def trial_params(spec: Any) -> dict[str, Any]:
    """The params of a trial's run from its TrialSpec: every setting that changes a result, as configured
    and as the grid resolved it (model and train settings under their own names as earlier sweeps logged
    them: d_model, pos_encoding, lr, augment.mixup, ...; task options as task.<name>; the plan's verdicts
    as plan.*). The worker adds what only it resolves (precision, scan_impl, parameter counts) on top;
    model.scan_impl and train.precision are also kept as *_requested."""
    train = {k: v for k, v in asdict(spec.train).items() if k != "inject"}  # inject: test hooks only
    budget = spec.budget
    return {
        **flatten(train), **flatten(asdict(spec.model)),
        PRECISION_REQUESTED: spec.train.precision, SCAN_IMPL_REQUESTED: spec.model.scan_impl,
        **flatten(dict(spec.task_options), "task."),
        "variant": spec.variant, FRONTEND: spec.frontend, "pattern": spec.pattern,
        "attention_positions": [i for i, c in enumerate(spec.pattern) if c == "A"], "dataset": spec.dataset,
        "fold": spec.fold_label, "clip_seconds": spec.clip_seconds, NUM_CLASSES: spec.num_classes,
        TOKENS_PER_CLIP: spec.tokens, POOL_TOKENS: spec.pool_tokens or "all",
        "num_workers": spec.resources.num_workers, "gpu_memory_gb": spec.resources.gpu_memory_gb,
        PLAN_FEASIBILITY: budget.feasibility,
        **{plan_feasibility_name(impl): v for impl, v in budget.feasibility_by_impl.items()},
        PRECISION: budget.precision or spec.train.precision,  # the plan's for a GPU; the worker logs what ran
        "micro_batch": budget.micro_batch, "grad_accum": budget.grad_accum,
    }


def mean_name(metric: str) -> str:
    return f"{metric}_mean"


def std_name(metric: str) -> str:
    return f"{metric}_std"


def parent_run_name(dataset: str, variant: str) -> str:
    return f"{dataset}/{variant}"


def trial_tags(trial_key: str, dataset: str, variant: str, fold: str | int) -> dict[str, str]:
    """The tags that identify a trial run (with kind=trial; the creator adds the parent's id)."""
    return {KIND: KIND_TRIAL, TRIAL_KEY: trial_key, DATASET: dataset, VARIANT: variant, FOLD: str(fold)}


def run_state(status: str) -> str:
    """The MLflow run state a trial run ends in, for its status tag."""
    return {FINISHED: "FINISHED", STOPPED: "KILLED", PLANNED_OOM: "KILLED", RULED_OOM: "KILLED"}.get(status, "FAILED")


def quote(value: str) -> str:
    """Quote a value for an MLflow filter string."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def tag_filter(tags: dict[str, str]) -> str:
    """An MLflow filter string matching runs with these tag values: tag_filter({KIND: KIND_TRIAL})."""
    return " and ".join(f"tags.{k} = {quote(v)}" for k, v in tags.items())


def param_value(value: object) -> str:
    """How a param is written: text as is, lists and dicts as JSON, cut to MLflow's 6,000 characters."""
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def fold_sort_key(fold: str | int) -> tuple[int, int | str]:
    """Numeric folds in numeric order ("2" before "10"), then named splits ("split")."""
    text = str(fold)
    return (0, int(text)) if text.isdigit() else (1, text)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1, the usual '±' over folds); std is None for n < 2."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)
