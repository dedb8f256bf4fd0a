"""A sweep's Ray workers find their own cluster's state API with a second Ray instance on the machine
(helix_sweep.sweep.ray_runtime): Ray Train's placement-group cleaner depends on it, and without it a
trial that Tune stops leaves its placement group behind and the next trials wait forever."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

PROBE = textwrap.dedent("""
    import sys
    import ray
    from helix_sweep.sweep.ray_runtime import runtime_env

    @ray.remote(num_cpus=0)
    class Probe:
        def own_state(self):  # what Ray Train's PlacementGroupCleaner asks about its controller
            from ray.util.state import get_actor
            try:
                return get_actor(ray.get_runtime_context().get_actor_id()).state
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

    pinned = sys.argv[1] == "pinned"
    ray.init(address="local", num_cpus=1, runtime_env=runtime_env() if pinned else {})
    print("STATE", ray.get(Probe.remote().own_state.remote()))
""")


@pytest.fixture
def other_ray():
    """Another Ray instance on this machine, as a second sweep or a test cluster would be (in a short
    temp folder: Ray's socket paths must fit 107 bytes)."""
    tmp_path = Path(tempfile.mkdtemp(prefix="hxray-"))
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--num-cpus=0",
                    f"--temp-dir={tmp_path / 'ray'}", "--include-dashboard=false"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield
    finally:  # only this instance's processes: other Ray instances on the machine are not ours
        subprocess.run(["pkill", "-9", "-f", str(tmp_path / "ray")], capture_output=True)
        shutil.rmtree(tmp_path, ignore_errors=True)


# unpinned: the failure the hook prevents (so the test can tell them apart); outside CI, it costs a ray.init
@pytest.mark.parametrize("mode,expected", [("pinned", "STATE ALIVE"),
                                           pytest.param("unpinned", "multiple active Ray instances",
                                                        marks=pytest.mark.slow)])
def test_workers_ask_their_own_cluster_with_another_ray_running(other_ray, tmp_path, mode, expected):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [x for x in done.stdout.splitlines() if x.startswith("STATE")]
    assert expected in line, line


def test_lean_trainer_leaves_out_only_the_cleaner_and_datasets_callbacks(tmp_path):
    """A local grid's trials fit a TorchTrainer without the placement-group cleaner and the Ray Datasets
    callback (two actor processes per trial that cannot act there); every other default callback stays,
    and anywhere else (a cluster, a search) trials fit Ray's own TorchTrainer."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from helix_sweep.config import load_config
    from helix_sweep.sweep.driver import lean_train
    from helix_sweep.sweep.ray_runtime import trainer_class

    def callbacks(cls):
        trainer = cls(lambda config: None, scaling_config=ScalingConfig(num_workers=1),
                      run_config=RunConfig(name="t", storage_path=str(tmp_path)))
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    assert trainer_class(lean=False) is TorchTrainer
    lean = trainer_class(lean=True)
    assert issubclass(lean, TorchTrainer) and lean is not TorchTrainer
    full = callbacks(TorchTrainer)
    assert {"PlacementGroupCleanerCallback", "DatasetsCallback", "BackendSetupCallback"} <= set(full)
    assert callbacks(lean) == [c for c in full if c not in ("PlacementGroupCleanerCallback", "DatasetsCallback")]

    # one CPU worker: Ray's DataParallelTrainer with the plain backend, the same callbacks otherwise
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    single = trainer_class(lean=True, torch_backend=False)
    assert issubclass(single, DataParallelTrainer) and not issubclass(single, TorchTrainer)
    assert callbacks(single) == callbacks(lean)
    assert trainer_class(lean=False, torch_backend=False) is TorchTrainer

    assert lean_train(load_config([]))
    assert not lean_train(load_config(["ray_address=127.0.0.1:6379"]))
    assert not lean_train(load_config(["search.num_samples=4"]))

    # nothing of a lean grid asks the state API: its local Ray starts without the dashboard; a search keeps it
    from helix_sweep.sweep.ray_runtime import init_options

    assert init_options(lean=True) == {"include_dashboard": False}
    assert init_options(lean=False) == {}


def test_a_single_cpu_worker_trials_controller_needs_no_torch(tmp_path):
    """What a lean one-CPU-worker trial sends its controller process (the run context and the callbacks)
    unpickles without importing torch; a TorchTrainer's (its TorchConfig) imports it."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig

    from helix_sweep.config import load_config
    from helix_sweep.sweep.grid import expand_grid
    from helix_sweep.sweep.ray_runtime import trainer_class

    spec = expand_grid(load_config(["variants=[mamba-raw]"]))[0]

    def controller_imports_torch(cls, **kw) -> bool:
        trainer = cls(lambda config: None, train_loop_config={"trial": spec},
                      scaling_config=ScalingConfig(num_workers=1),
                      run_config=RunConfig(name="t", storage_path=str(tmp_path)), **kw)
        blob = tmp_path / "controller.pkl"
        blob.write_bytes(cloudpickle.dumps((trainer.train_run_context, trainer._create_default_callbacks())))
        code = f"import pickle, sys; pickle.loads(open({str(blob)!r}, 'rb').read()); print('torch' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip() == "True"

    from ray.train.torch import TorchConfig

    assert not controller_imports_torch(trainer_class(lean=True, torch_backend=False),
                                        torch_config=TorchConfig(backend="gloo"))
    assert controller_imports_torch(trainer_class(lean=True), torch_config=TorchConfig(backend="gloo"))


def test_only_a_one_cpu_worker_trial_of_a_local_grid_trains_in_tunes_actor(tmp_path):
    # trainable.in_actor: the smoke grid's trials skip a Ray Train run; GPU, DDP, cluster and search
    # trials, and resources.trial_runner=train, keep it (and with it Ray Train's worker restarts)
    from dataclasses import replace

    from helix_sweep.config import ConfigError
    from helix_sweep.run import plan_trials
    from helix_sweep.sweep.trainable import in_actor, trial_resources

    _, [spec] = plan_trials(["variants=[mamba-raw]", f"workdir={tmp_path}"])
    lean, full = {"lean_train": True}, {"lean_train": False}  # the driver's own Ray for a grid, or not
    assert in_actor(spec, lean, use_gpu=False)
    assert trial_resources(spec, lean, use_gpu=False) == {"cpu": 1}
    assert not in_actor(spec, full, use_gpu=False) and not in_actor(spec, lean, use_gpu=True)
    assert trial_resources(spec, full, use_gpu=False) == {"cpu": 0, "memory": 1}  # its Train workers hold the CPUs
    ddp = replace(spec, resources=replace(spec.resources, num_workers=2))
    assert not in_actor(ddp, lean, use_gpu=False)
    _, [train] = plan_trials(["variants=[mamba-raw]", f"workdir={tmp_path}", "resources.trial_runner=train"])
    assert not in_actor(train, lean, use_gpu=False)
    with pytest.raises(ConfigError, match="resources.trial_runner='actor': expected one of auto, train"):
        plan_trials(["variants=[mamba-raw]", f"workdir={tmp_path}", "resources.trial_runner=actor"])
