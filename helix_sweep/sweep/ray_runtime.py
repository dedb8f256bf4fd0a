"""What every Ray worker process of a sweep starts with: the runtime_env of the driver's ray.init.

- RAY_TRAIN_HEALTH_CHECK_INTERVAL_S 0.5: Ray Train's controller polls its workers every 2 s by
  default and a worker's report waits for the poll; short epochs (the smoke grid, the tests) spent
  most of their time there, and 0.5 s costs nothing.
- RAY_TRAIN_ENABLE_PREEMPTION_WATCHER 0: one more actor process per trial that only logs node drains
  (we never read ray.train.get_preemption_info; a drained node's trial resumes from its checkpoint).
- RAY_ADDRESS pinned to the worker's own cluster (a setup hook: the address is known only once the
  worker has joined). Ray Train's PlacementGroupCleaner asks the state API, without an address,
  whether its controller still lives. With a second Ray instance on the machine (another sweep, a
  test cluster) that call fails with "Found multiple active Ray instances", the cleaner's thread
  dies, and the placement group of a trial that Tune stopped (ASHA, a search's early stop) is never
  removed: its CPUs or GPUs stay held and the next trials wait for them forever.

`trainer_class(lean)`: on a local Ray running a grid (no scheduler that stops trials), each trial's
TorchTrainer leaves out two per-trial helpers that cannot act there: the PlacementGroupCleaner (an
actor process polling the state API every second, which removes a trial's placement group if its
controller dies while the driver lives: a Tune-stopped trial or a lost node, which a local grid
does not have; when the driver dies, Ray removes the job's groups itself) and the Ray
Datasets callback (a DatasetManager actor per trial; our workers read Arrow shards, no Ray Datasets).
Each is a process importing ray.train: together ~10 s of CPU per trial on 2 cores (benchmarks/RESULTS.md).
Ray has no switch for them, so this overrides the trainer's private `_create_default_callbacks`;
where that or the callback classes have moved (another Ray), it is Ray's TorchTrainer unchanged.
A lean trial of one CPU worker (the smoke grid's) also has no torch process group to set up (a
world of one issues no collective, helix_sweep.training.distributed): it fits Ray's
DataParallelTrainer with the plain backend instead of TorchTrainer, whose TorchConfig, unpickled in
the trial's controller process, makes that process import torch (~2.5 s of CPU per trial on 2 cores).

`init_options(lean)`: the local Ray of a lean grid starts without its dashboard. The dashboard
serves the state API, which only the PlacementGroupCleaner (left out there) and Ray Train's state
tracking (off unless RAY_TRAIN_ENABLE_STATE_TRACKING) ask; it is ten Python processes, ~1 s of
ray.init and ~2-3 s of CPU on a 2-core machine (benchmarks/RESULTS.md). A search or a cluster keeps
it (a cluster's is the head's, started by `ray start`).
"""

from __future__ import annotations

import logging
import os
from functools import cache

log = logging.getLogger(__name__)

TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
             "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")}


def init_options(lean: bool) -> dict:
    """ray.init's options for the driver's own local Ray, beyond its runtime_env."""
    return {"include_dashboard": False} if lean else {}


def pin_ray_address() -> None:
    """Worker setup hook: this process's Ray is the one the state API should ask."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def runtime_env() -> dict:
    return {"env_vars": {"PYTHONUNBUFFERED": "1", **TRAIN_ENV},
            "worker_process_setup_hook": f"{__name__}.pin_ray_address"}


def trainer_class(lean: bool, torch_backend: bool = True):
    """The trainer class a trial fits: Ray's TorchTrainer, or with `lean` the one without the helpers
    above; with `lean` and not `torch_backend` (one CPU worker) the lean DataParallelTrainer. Every one
    takes TorchTrainer's arguments (the lean DataParallelTrainer drops torch_config). Only a
    TorchTrainer imports torch (ray.train.torch does), so the lean DataParallelTrainer leaves the
    trial actor that builds it without torch."""
    lean_cls = lean and _lean_trainer(torch_backend)
    if lean_cls:
        return lean_cls
    from ray.train.torch import TorchTrainer

    return TorchTrainer


@cache
def _lean_trainer(torch_backend: bool):
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    except ImportError as exc:
        log.info("Ray Train's default callbacks moved (%s): trials use the full TorchTrainer", exc)
        return None
    if not callable(getattr(DataParallelTrainer, "_create_default_callbacks", None)):
        log.info("Ray Train's trainers changed: trials use the full TorchTrainer")
        return None
    unneeded = (DatasetsCallback, PlacementGroupCleanerCallback)

    class WithoutHelpers:
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unneeded)]

    if not torch_backend:
        class LeanTrainer(WithoutHelpers, DataParallelTrainer):
            def __init__(self, train_loop_per_worker, *, torch_config=None, **kwargs):
                super().__init__(train_loop_per_worker, **kwargs)  # the plain backend: no process group

        return LeanTrainer
    from ray.train.torch import TorchTrainer

    if not issubclass(TorchTrainer, DataParallelTrainer):
        log.info("Ray Train's trainers changed: trials use the full TorchTrainer")
        return None

    class LeanTorchTrainer(WithoutHelpers, TorchTrainer):
        pass

    return LeanTorchTrainer
