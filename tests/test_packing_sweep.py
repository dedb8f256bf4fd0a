"""Packed trials on a real Ray cluster with one fake GPU, through the real CLI in a subprocess.

- resources.gpus_per_worker=auto with cpus_per_gpu=2: the planner gives each small trial 1/2 of a
  GPU, Ray places both trials' Train workers on the one GPU at once (seen through Ray's state API:
  two workers alive together, each holding 0.5 GPU), and no more than that.
- A packed trial that runs out of memory (train.inject oom_at_step) is fitted again on a whole GPU
  (another Train worker, holding 1.0 GPU, in the same MLflow run); with the fault gone it finishes,
  with it still there it counts as oom (marked slow: four Train runs, two of them one after the other).

Fake GPUs: torch.cuda stays unavailable, so the trials train on CPU with the gloo backend. Fixtures
(HOME and a short RAY_TMPDIR per test) as in test_cluster_sweep.
"""

from __future__ import annotations

import re

import pytest

from sweep_process import trial_runs
from test_cluster_sweep import free_port, ray_env, watch_sweep  # noqa: F401  (ray_env is a fixture)

TINY = ["datasets=[synth-commands]", "train.epochs=1", "resources.cpus_per_gpu=2"]


def gpu_share(worker) -> float:
    """The GPU a Train worker holds: its share of the trial's placement group (GPU_group_<pg id>)."""
    [share] = [v for k, v in worker.required_resources.items() if re.fullmatch(r"GPU_group_[0-9a-f]+", k)]
    return share


def sweep_on_one_fake_gpu(workdir, *args) -> tuple[str, list, list]:
    """Run the CLI against a head (no CPU) and one node with 2 CPUs and 1 fake GPU; return the driver
    log, the Train workers and how many were alive at each poll."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": free_port()})
    try:
        cluster.add_node(num_cpus=2, num_gpus=1)
        return watch_sweep(workdir, cluster, [*TINY, *args],
                           lambda ws: sum(a.state == "ALIVE" for a in ws), every=0.5)
    finally:
        cluster.shutdown()


@pytest.mark.slow  # ~80 s of Ray sweep; the packing policy and plan stay in CI (test_packing.py)
def test_packed_trials_share_one_gpu(ray_env):
    workdir, _ = ray_env
    log, workers, alive = sweep_on_one_fake_gpu(workdir, "variants=[helix-mel,attention-mel]")
    # the plan: half a GPU each (two per GPU: the node's 2 CPUs), so Tune runs both at once
    assert "1 GPUs now, 1 reachable; 2 trials, up to 2 at once" in log, log[-3000:]
    assert "helix-mel/split=32x1@1/2" in log
    # both Train workers on the one GPU together, each holding half of it
    assert max(alive) == 2, alive
    assert [gpu_share(w) for w in workers] == [0.5, 0.5], [w.required_resources for w in workers]
    runs = trial_runs(workdir)
    assert sorted(r.data.tags["status"] for r in runs) == ["finished", "finished"]
    first_end = min(r.info.end_time for r in runs)
    assert all(r.info.start_time < first_end for r in runs)  # the runs overlap in time


@pytest.mark.slow
def test_a_packed_oom_retries_once_on_a_whole_gpu(ray_env):
    """helix-mel runs out of memory once (oom_marker), packed: on the whole GPU it finishes;
    attention-mel runs out of memory every time: after one whole-GPU retry it counts as oom."""
    workdir, _ = ray_env
    marker = workdir / "oom"
    log, workers, alive = sweep_on_one_fake_gpu(
        workdir, "variants=[helix-mel,attention-mel]",
        f"train.inject={{oom_at_step: 1, per_trial: {{helix-mel: {{oom_marker: {marker}}}}}}}")
    assert max(alive) == 2, alive  # both packed attempts at once
    # each trial: once on half the GPU, once on the whole GPU (a Train worker each), never more
    assert sorted(gpu_share(w) for w in workers) == [0.5, 0.5, 1.0, 1.0], [w.required_resources for w in workers]
    for variant in ("helix-mel", "attention-mel"):
        assert log.count(f"synth-commands/{variant}/split ran out of memory on 1/2 of a GPU: retrying on a "
                         f"whole GPU") == 1, log[-3000:]
    runs = {r.data.tags["trial_key"]: r for r in trial_runs(workdir)}  # one MLflow run per trial
    helix, attention = runs["synth-commands/helix-mel/split"], runs["synth-commands/attention-mel/split"]
    assert len(runs) == 2
    assert helix.data.tags["status"] == "finished" and "stop_reason" not in helix.data.tags
    assert attention.data.tags["status"] == "oom" and "out of memory at" in attention.data.tags["stop_reason"]
    for run in (helix, attention):
        assert "out of memory on 1/2 of a GPU, retried on a whole GPU" in run.data.tags["packed_oom"]
