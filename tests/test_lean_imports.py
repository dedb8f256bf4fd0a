"""What a trial's worker process pays before its first step: no import it does not need.

Every trial starts fresh Ray processes, so an import costs its seconds once per trial (on the 2-core
machines, 2 s each for torch._dynamo and scipy.signal, benchmarks/RESULTS.md "smoke sweep"). Each check
runs in a new interpreter, since this one may have imported anything already.
"""

import subprocess
import sys

import torch

from helix_sweep.models.classifier import classifier_params
from helix_sweep.models.matching import bimamba_params, mamba_params


def imported_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=300)
    return set(out.stdout.split())


def test_building_and_counting_a_model_skips_torch_dynamo():
    # parameter matching counts a BiMamba layer; on the meta device that imported torch._dynamo
    modules = imported_after(
        "from helix_sweep.models import build_classifier, classifier_params\n"
        "build_classifier('MMMAMM', 'mel', 6, d_model=32, d_state=8)\n"
        "classifier_params('AAAAAA', 'raw', 6, 32, 8)")
    assert "helix_sweep.models.matching" in modules
    assert "torch._dynamo" not in modules


def test_opening_generated_synthetic_data_skips_scipy(tmp_path):
    from helix_sweep.data import open_task

    open_task(tmp_path, "synth-commands")  # generates it here, with scipy
    modules = imported_after(f"from helix_sweep.data import open_task\nopen_task({str(tmp_path)!r}, 'synth-concat')")
    assert "helix_sweep.data.synthetic" in modules
    assert "scipy.signal" not in modules


def test_counting_parameters_leaves_the_global_rng_alone():
    # counting builds real modules on the CPU: a model initialised afterwards must not see a different RNG
    for count in (mamba_params, bimamba_params, classifier_params):
        count.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    assert mamba_params(32, 8) > 0 and bimamba_params(48, 8) > 0 and classifier_params("MMMAMM", "raw", 6, 32, 8) > 0
    assert torch.equal(torch.rand(4), expected)


def test_the_tune_trial_actor_builds_a_one_cpu_worker_trainer_without_torch_or_mlflow(tmp_path):
    # the trial actor only builds and waits on the trainer: torch and MLflow (~3 s of CPU on 2 cores)
    # belong to the Train worker, which imports the training code itself (trainable.train_loop).
    # In a real Tune trial actor: the trainer's TuneReportCallback needs a Tune session.
    import os
    import pickle

    from helix_sweep.run import plan_trials

    _, [spec] = plan_trials(["variants=[mamba-raw]", f"workdir={tmp_path}"])
    where = {"tracking": {"uri": "http://127.0.0.1:1"}, "storage_path": str(tmp_path / "trials"),
             "max_failures": 0, "lean_train": True}
    code = (
        "import pickle, sys\n"
        "import ray\n"
        "from ray import tune\n"
        "from helix_sweep.sweep import trainable\n"
        f"spec = pickle.loads({pickle.dumps(spec)!r})\n"
        "def probe(config):\n"
        f"    trainer = trainable.make_trainer(spec, {where!r}, use_gpu=False)\n"
        "    tune.report({'loop': trainer.train_loop_per_worker is trainable.train_loop,\n"
        "                 'imported': [m for m in ('torch', 'mlflow') if m in sys.modules]})\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
        f"[result] = tune.Tuner(probe, run_config=tune.RunConfig(storage_path={str(tmp_path / 'tune')!r})).fit()\n"
        "print('PROBE', result.metrics['loop'], result.metrics['imported'])\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [x for x in done.stdout.splitlines() if x.startswith("PROBE")]
    assert line == "PROBE True []", line
