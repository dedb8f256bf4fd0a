"""The Tune trial: `train_trial`, which runs in Tune's trial actor and fits one Ray Train trainer for
the trial (the supported Train-inside-Tune pattern of Train V2), and `train_loop`, the function its
Train workers run; or, for a trial of one CPU worker on the driver's own local Ray (`in_actor`),
trains it in the actor itself.

Its RunConfig has a name from the trial key and a fixed storage path, so a relaunched trial
(restored driver, retried error) resumes that Train run from its latest checkpoint.

Imports are kept to what a trial actor that fits a Train run uses (Ray Tune and Train, the config
types): it only builds and waits on the trainer, and on a 2-core machine torch and MLflow cost it
~3 s of CPU at each start, ahead of its trial's first step. torch comes in only for a GPU trial (its
process group backend), MLflow and the training package only on the error path; the Train workers
import the training code themselves (train_loop). A trial trained in the actor imports them there
(train_here), once per actor: Tune reuses it for the next trial.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import ray

from helix_sweep.config import ResourceConfig, TrialSpec
from helix_sweep.sweep import ray_runtime
from helix_sweep.sweep import schema as S
from helix_sweep.sweep.search import apply_sample

log = logging.getLogger(__name__)

WHOLE_GPU = "whole_gpu"  # in a trial's Train run directory: it ran out of memory packed, retried whole


def train_loop(config: dict) -> str:
    """Ray Train's train_loop_per_worker (helix_sweep.sweep.worker.train_worker, imported here, in the
    Train worker, not in the trial actor that pickles this function by reference)."""
    from helix_sweep.sweep.worker import train_worker

    return train_worker(config)


def train_trial(config: dict, specs: dict[str, TrialSpec], where: dict) -> None:
    """The Tune trainable: fit one Train trainer for this trial (resuming its Train run if any).

    config carries only the trial key (and a search's sampled values), so Tune's table and state
    stay small; the TrialSpecs themselves ride along through tune.with_parameters and on to the
    Train workers (train_loop_config), in the one form they have from grid expansion on.
    `where` (tracking URI and wait, storage path, max_failures, lean_train) also comes through
    tune.with_parameters, from the driver that launches the trial: Tuner.restore restores each
    trial's config as it was pickled, but takes the trainable (and its parameters) anew, so a
    restored trial logs to the tracking server the driver was restarted with."""
    spec = apply_sample(specs[config["trial_key"]], config)  # a search sample's train.* values, if any
    run_dir = train_run_dir(spec, where)
    use_gpu = uses_gpu(spec.resources, float(ray.cluster_resources().get("GPU", 0)))  # resolved by the driver
    if use_gpu and spec.budget.gpu_fraction < 1 and (Path(run_dir) / WHOLE_GPU).exists():
        spec = on_whole_gpu(spec)  # it ran out of memory packed before a driver restart: stays whole
    trainer = lambda spec: make_trainer(spec, where, use_gpu)  # built inside the try: Ray checks the storage
    try:
        if in_actor(spec, where, use_gpu):
            train_here(spec, where)
            return
        result = trainer(spec).fit()
        if use_gpu and spec.budget.gpu_fraction < 1 and getattr(result, "return_value", None) == S.OOM:
            # Out of memory on a share of a GPU (a sharer may have grown, or the plan was tight): once
            # more, on a whole GPU, before it counts as oom. Same Train run, so it resumes from the
            # latest checkpoint and the worker reopens the trial's MLflow run, left open for this
            # (worker.RayMlflowReporter.finish). The marker keeps a relaunch after a driver restart
            # on the whole GPU. One refit here, in the Tune trial, instead of a second Tune pass:
            # the trial's Tune state, searcher and results stay one trial.
            from helix_sweep.training import format_fraction

            log.warning("%s ran out of memory on %s of a GPU: retrying on a whole GPU", spec.key,
                        format_fraction(spec.budget.gpu_fraction))
            (Path(run_dir) / WHOLE_GPU).touch()
            trainer(on_whole_gpu(spec)).fit()
    except Exception as exc:
        # the storage may have failed where the worker could not see it (Ray Train checking it or
        # its controller writing its record): one clear error, and the trial's run marked failed
        from helix_sweep.training import check_writable, storage_error

        try:
            check_writable(run_dir)
        except OSError as cause:
            error = storage_error(spec.key, run_dir, cause)
            end_run(where["tracking"]["uri"], spec, run_dir, S.FAILED, str(error))
            raise error from exc
        raise


def in_actor(spec: TrialSpec, where: dict, use_gpu: bool) -> bool:
    """resources.trial_runner: "auto" trains a trial of one CPU worker on the driver's own local Ray
    for a grid (where["lean_train"]) in Tune's trial actor itself; everything else, and "train",
    in a Ray Train run. A Train run starts a controller and a worker process per trial, each
    importing Ray Train (the worker torch and this package as well): ~15-20 s of a smoke trial on
    2 cores (benchmarks/RESULTS.md), for no gain with one process on CPU: no process group, no GPU
    to place, and a reused Tune actor has its imports done. Fault tolerance is the same: a killed
    actor is a failed trial, which Tune relaunches (tune.FailureConfig, the same max_failures) and
    which resumes from the run directory's newest checkpoint."""
    r = spec.resources
    return (r.trial_runner == "auto" and bool(where.get("lean_train")) and r.num_workers == 1
            and not use_gpu)


def train_here(spec: TrialSpec, where: dict) -> None:
    """The trial in this (Tune's) actor: the Train worker's code with an ActorSession."""
    from helix_sweep.sweep.worker import ActorSession, train_worker

    train_worker(train_loop_config(spec, where), session=ActorSession())


def trial_resources(spec: TrialSpec, where: dict, use_gpu: bool) -> dict:
    """What the Tune trial itself asks Ray for: the worker's CPUs when it trains in its own actor;
    else a non-empty bundle that holds no CPU (it only waits on its Train run, whose workers hold the
    real resources)."""
    return {"cpu": spec.resources.cpus_per_worker} if in_actor(spec, where, use_gpu) else {"cpu": 0, "memory": 1}


def train_loop_config(spec: TrialSpec, where: dict) -> dict:
    return {"trial": spec, "tracking": {**where["tracking"], "run_dir": train_run_dir(spec, where)},
            "threads": max(1, int(spec.resources.cpus_per_worker))}


def make_trainer(spec: TrialSpec, where: dict, use_gpu: bool):
    """The trial's Train trainer: its workers, their resources, and a RunConfig whose name and storage
    path resume the trial's Train run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    r = spec.resources
    torch_backend = use_gpu or r.num_workers > 1
    trainer_cls = ray_runtime.trainer_class(lean=where.get("lean_train", False), torch_backend=torch_backend)
    return trainer_cls(
        train_loop,
        train_loop_config=train_loop_config(spec, where),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=worker_resources(spec, use_gpu)),
        **({"torch_config": torch_config()} if torch_backend else {}),
        run_config=RunConfig(
            name=trial_dir_name(spec.key), storage_path=where["storage_path"],  # same name: resumes
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=where["max_failures"]),
        ),
    )


def torch_config():
    """The process group backend of a trial with one: NCCL on real GPUs (Ray's default), else gloo
    (fake GPU resources in tests, CPU-only DDP)."""
    import torch
    from ray.train.torch import TorchConfig

    return None if torch.cuda.is_available() else TorchConfig(backend="gloo")


def worker_resources(spec: TrialSpec, use_gpu: bool) -> dict:
    """What each Train worker of the trial asks Ray for: its CPUs and, on a GPU cluster, its planned
    GPU share (spec.budget.gpu_fraction: a fraction packs it beside other trials on one GPU)."""
    return {"CPU": spec.resources.cpus_per_worker, **({"GPU": spec.budget.gpu_fraction} if use_gpu else {})}


def on_whole_gpu(spec: TrialSpec) -> TrialSpec:
    return replace(spec, budget=replace(spec.budget, gpu_fraction=max(1.0, spec.budget.gpu_fraction)))


def uses_gpu(r: ResourceConfig, gpus: float) -> bool:
    """resources.use_gpu: "auto" means yes when the cluster has or can add GPUs."""
    return {"auto": gpus > 0, "true": True, "false": False}[str(r.use_gpu).lower()]


def end_run(uri: str, spec: TrialSpec, run_dir: str | Path, status: str, reason: str = "") -> None:
    """Best effort: the trial's MLflow run, if still tagged running, ends with `status` and the reason
    (with the server away, the end waits in the trial's pending file for the next run or report)."""
    from helix_sweep.sweep import trial_run

    try:
        trial_run.end_trial_run(uri, spec.experiment, spec.key, spec.dataset, spec.variant, spec.fold_label,
                                run_dir, status, reason)
    except Exception as exc:  # the trial's error carries the reason anyway
        log.warning("could not mark %s %s in MLflow: %s", spec.key, status, exc)


def trial_dir_name(key: str) -> str:
    """A trial's folder (and Train run) name: its key, slashes being path separators."""
    return key.replace("/", "__")


def train_run_dir(spec: TrialSpec, where: dict) -> str:
    """The trial's Train run directory: its checkpoints, best/ and pending tracking writes."""
    return str(Path(where["storage_path"]) / trial_dir_name(spec.key))
