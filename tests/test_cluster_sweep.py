"""The sweep on real multi-node Ray clusters with fake GPUs, through the real CLI in a subprocess.

- ray.cluster_utils.Cluster: a head with no CPU and two worker nodes declaring one GPU each. Both
  trials run at once (max_concurrent_trials derived from the cluster's 2 GPUs), one per node, each
  trial's Train worker holding one GPU; seen through Ray's state API (actors, their nodes and
  resources) and the MLflow runs' times.
- Ray's fake multi-node autoscaler (cluster/fake_cluster.yaml, `RAY_FAKE_CLUSTER=1 ray start`):
  the cluster starts with no GPU; the sweep asks for one and the autoscaler adds a GPU worker node.

Fake GPUs: torch.cuda stays unavailable, so the trials train on CPU with the gloo backend.
Everything Ray writes goes to a short temp dir of the test (RAY_TMPDIR; unix socket paths must stay
short) and HOME points at the test folder. Teardown stops only the processes the test started.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from helix_sweep.sweep.tracking import stop_tracking_server
from sweep_process import env_for, kill_group, start, trial_runs, wait_for

ROOT = Path(__file__).resolve().parent.parent
TINY = ["datasets=[synth-commands]", "train.epochs=1"]


@pytest.fixture
def ray_env(tmp_path, monkeypatch):
    """HOME in the test folder, Ray's temp dir short and private, no token auth; MLflow stopped after."""
    short = Path(tempfile.mkdtemp(prefix="hx", dir="/tmp"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_TMPDIR", str(short))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    yield tmp_path, short
    stop_tracking_server(tmp_path)
    shutil.rmtree(short, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_workers(address: str) -> list:
    """Ray Train's worker actors in the cluster (alive or dead), from Ray's state API."""
    from ray.util.state import list_actors

    return list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                       raise_on_missing_output=False)


def watch_sweep(workdir, cluster, args: list[str], sample, every: float) -> tuple[str, list, list]:
    """Run the CLI against `cluster` until it exits, calling sample(train workers) every `every` s;
    return the driver log, the Train workers at the end and the samples. The sweep must succeed."""
    driver, samples = start(workdir, *args, f"ray_address={cluster.address}"), []
    try:
        while driver.poll() is None:
            samples.append(sample(train_workers(cluster.address)))
            time.sleep(every)
        log = (workdir / "driver.log").read_text()
        assert driver.returncode == 0, log[-3000:]
        return log, train_workers(cluster.address), samples
    finally:
        if driver.poll() is None:
            kill_group(driver)


@pytest.mark.slow  # outside CI (suite time): multi-node on fake GPUs; test_packing_sweep schedules fake GPUs in CI
def test_trials_spread_over_gpu_nodes_and_run_at_once(ray_env):
    from ray.cluster_utils import Cluster

    workdir, _ = ray_env
    # the dashboard (Ray's state API) on a free port: 8265 may belong to another Ray on the machine
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": free_port()})
    try:
        nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        gpu_nodes = {n.node_id for n in nodes}
        # one whole GPU per trial (no packing: this test is about spreading over nodes)
        log, workers, seen_alive = watch_sweep(
            workdir, cluster, [*TINY, "variants=[helix-mel,attention-mel]", "resources.gpus_per_worker=1"],
            lambda ws: {a.node_id for a in ws if a.state == "ALIVE"}, every=1.0)
    finally:
        cluster.shutdown()
    # one Train worker per trial, each on its own GPU node, each holding one (fake) GPU
    assert len(workers) == 2, workers
    assert {w.node_id for w in workers} == gpu_nodes
    # a Train worker holds its share of the trial's placement group: GPU_group_<pg id> (plus per-bundle keys)
    gpus = [[v for k, v in w.required_resources.items() if re.fullmatch(r"GPU_group_[0-9a-f]+", k)] for w in workers]
    assert gpus == [[1.0], [1.0]], [w.required_resources for w in workers]
    # both trials ran at the same time: no trial waited while a GPU was free
    assert "2 GPUs now, 2 reachable; 2 trials, up to 2 at once" in log
    assert max(len(s) for s in seen_alive) == 2, seen_alive
    runs = trial_runs(workdir)
    assert sorted(r.data.tags["status"] for r in runs) == ["finished", "finished"]
    first_end = min(r.info.end_time for r in runs)
    assert all(r.info.start_time < first_end for r in runs)  # the runs overlap in time
    # on a GPU cluster the planner sets the micro-batch (here the whole batch fits): logged per trial
    assert {r.data.params["micro_batch"] for r in runs} == {"32"}
    assert {r.data.params["grad_accum"] for r in runs} == {"1"}


def processes_of(temp: Path) -> list:
    """Every process of a Ray started with RAY_TMPDIR=temp (it, its nodes, workers, the driver)."""
    own = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        if p.pid in own:
            continue
        if str(temp) in " ".join(p.info["cmdline"] or []) or (p.info["environ"] or {}).get("RAY_TMPDIR") == str(temp):
            found.append(p)
    return found


def stop_ray_of(temp: Path) -> None:
    """What `ray stop` would do, limited to this test's Ray (ray stop stops every Ray on the machine)."""
    for p in processes_of(temp):
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    wait_for(lambda: not processes_of(temp), 30, f"the processes of {temp} to exit", poll=0.5)


@pytest.mark.slow  # outside CI (suite time): multi-node on fake GPUs; test_packing_sweep schedules fake GPUs in CI
def test_fake_autoscaler_adds_a_gpu_node_for_the_sweep(ray_env):
    workdir, short = ray_env
    port, dashboard = free_port(), free_port()
    fake = yaml.safe_load((ROOT / "cluster" / "fake_cluster.yaml").read_text())
    fake["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config = short / "fake_cluster.yaml"
    config.write_text(yaml.safe_dump(fake))
    # the driver finds the autoscaler's GPU budget where `ray up` leaves the cluster YAML on a head
    shutil.copy(config, workdir / "ray_bootstrap_config.yaml")
    env = {**env_for(workdir), "RAY_FAKE_CLUSTER": "1"}
    ray_bin = Path(sys.executable).with_name("ray")
    try:
        subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                        f"--temp-dir={short / 'ray'}", f"--dashboard-port={dashboard}", "--disable-usage-stats",
                        f"--autoscaling-config={config}"], env=env, check=True, capture_output=True, timeout=180)
        address = f"127.0.0.1:{port}"
        driver = start(workdir, *TINY, "variants=[helix-mel]", f"ray_address={address}")
        assert driver.wait(timeout=600) == 0, (workdir / "driver.log").read_text()[-3000:]
        from ray.util.state import list_nodes

        nodes = list_nodes(address=address, detail=True)
        workers = train_workers(address)
        runs = trial_runs(workdir)
    finally:
        stop_ray_of(short)
    log = (workdir / "driver.log").read_text()
    assert "0 GPUs now, 2 reachable" in log  # started without a GPU, knowing the autoscaler can add two
    head = [n for n in nodes if n.is_head_node]
    added = [n for n in nodes if not n.is_head_node]
    assert len(head) == 1 and head[0].resources_total.get("GPU", 0) == 0
    assert added and all(n.resources_total.get("GPU") == 1 for n in added)  # ray.worker.gpu nodes
    # the trial trained on an added GPU node, in one go (no worker lost to a node the autoscaler dropped)
    assert len(workers) == 1 and workers[0].node_id in {n.node_id for n in added}, (workers, nodes)
    assert [r.data.tags["status"] for r in runs] == ["finished"]
    assert not processes_of(short)
