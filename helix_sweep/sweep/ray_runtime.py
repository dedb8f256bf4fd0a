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
"""

from __future__ import annotations

import os

TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
             "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")}


def pin_ray_address() -> None:
    """Worker setup hook: this process's Ray is the one the state API should ask."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def runtime_env() -> dict:
    return {"env_vars": {"PYTHONUNBUFFERED": "1", **TRAIN_ENV},
            "worker_process_setup_hook": f"{__name__}.pin_ray_address"}
