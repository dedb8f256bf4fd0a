"""A real MLflow tracking server on loopback for tests (no mocks).

Use from a test module:

    from mlflow_server import mlflow_server  # noqa: F401  (pytest fixture)

    def test_x(mlflow_server):
        client = MlflowClient(mlflow_server.uri)

The server is started once per test session through `ensure_tracking_server` in a temporary work
directory and stopped (its whole process group) at the end. Start-up takes ~6-10 s on 2 cores.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

from helix_sweep.sweep.tracking import ensure_tracking_server, stop_tracking_server

_names = itertools.count()


@dataclass(frozen=True)
class MlflowServer:
    uri: str  # http://127.0.0.1:<port>
    workdir: Path  # the work directory whose mlflow/ holds the store and server.json

    def new_experiment(self, prefix: str = "test") -> tuple[str, str]:
        """Create a fresh experiment; returns (name, experiment_id)."""
        from mlflow.tracking import MlflowClient

        from helix_sweep.sweep.runs import get_or_create_experiment

        name = f"{prefix}-{next(_names)}"
        return name, get_or_create_experiment(MlflowClient(self.uri), name)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    workdir = tmp_path_factory.mktemp("mlflow-work")
    uri = ensure_tracking_server(workdir)
    try:
        yield MlflowServer(uri=uri, workdir=workdir)
    finally:
        stop_tracking_server(workdir)


# --------------------------------------------------------------------------------------------
# A fake sweep logged through the real client with the trial-run schema the workers use
# --------------------------------------------------------------------------------------------

TOKENS = {"raw": {"synth-textures": 500, "synth-commands": 100, "synth-concat": 1000, "synth-speaker": 3000,
                  "esc50": 500},
          "mel": {"synth-textures": 80, "synth-commands": 8, "synth-concat": 80, "synth-speaker": 184, "esc50": 80}}


def log_trial(client, experiment_id: str, parent_id: str, dataset: str, variant: str, fold: str,
              status: str, test_acc: list[float], val_acc: list[float] | None = None,
              tokens: int | None = None, epoch_seconds: float = 1.0, peak_mem_mb: float = 100.0,
              params: dict[str, str] | None = None) -> str:
    """One trial run as a worker logs it: tags, params, per-epoch metrics (step = epoch), epochs_done.

    `test_acc[e]` is the test accuracy (fraction) after epoch e+1; best_test_acc is its running max.
    With `val_acc`, test_acc_at_best_val is the test accuracy at the epoch of the best val_acc.
    `params` adds (or overrides) params of the run, e.g. attention_impl.
    """
    from mlflow.entities import Metric, Param

    from helix_sweep.sweep import schema as S

    key = f"{dataset}/{variant}/" + (f"fold{fold}" if str(fold).isdigit() else str(fold))
    frontend = variant.rsplit("-", 1)[1]
    run = client.create_run(experiment_id, run_name=key, tags={
        **S.trial_tags(key, dataset, variant, fold), S.STATUS: status, S.RESUMES: "0", S.HARDWARE: "cpu",
        S.PARENT_RUN_ID: parent_id})
    tokens = tokens if tokens is not None else TOKENS[frontend].get(dataset, 100)
    params = {"variant": variant, S.FRONTEND: frontend, "dataset": dataset, "fold": str(fold),
              S.TOKENS_PER_CLIP: str(tokens), S.POOL_TOKENS: "100" if "concat" in dataset else str(tokens),
              "lr": "0.0003", "epochs": str(len(test_acc)), "seed": "0", **(params or {})}
    metrics, t = [], 1_700_000_000_000
    best, best_val, at_val = -1.0, -1.0, None
    for e, acc in enumerate(test_acc, start=1):
        best = max(best, acc)
        row = {"train_loss": 2.0 / e, "train_acc": min(1.0, acc + 0.1), "test_loss": 2.2 / e, "test_acc": acc,
               "best_test_acc": best, "best_epoch": float(1 + test_acc.index(best)), "lr": 3e-4 / e,
               "epoch_seconds": epoch_seconds, "samples_per_s": 100.0, "peak_mem_mb": peak_mem_mb}
        if val_acc is not None:
            if val_acc[e - 1] > best_val:
                best_val, at_val = val_acc[e - 1], acc
            row.update(val_loss=1.0 / e, val_acc=val_acc[e - 1], test_acc_at_best_val=at_val)
        metrics += [Metric(k, float(v), t + e, e) for k, v in row.items()]
    if status == S.FINISHED:
        metrics.append(Metric(S.EPOCHS_DONE, float(len(test_acc)), t + len(test_acc), len(test_acc)))
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    if status != S.RUNNING:
        client.set_terminated(run.info.run_id, "FINISHED" if status == S.FINISHED else "FAILED")
    return run.info.run_id


@dataclass
class FakeSweep:
    name: str
    experiment_id: str
    folds: dict[str, list[str]]  # dataset -> planned folds
    variants: list[str]
    runs: dict[tuple[str, str, str], str]  # (dataset, variant, fold) -> run id
    best: dict[tuple[str, str, str], float]  # finished trials' best test accuracy
    at_best_val: dict[tuple[str, str, str], float]
    status: dict[tuple[str, str, str], str]  # every logged trial


def log_fake_sweep(client, name: str) -> FakeSweep:
    """A small partial sweep: synthetic fold / single-split / concat / speaker tasks and ESC-50 (paper
    numbers), four variants, finished trials plus pending, running, oom, planned_oom and diverged ones."""
    import numpy as np

    from helix_sweep.sweep.runs import ensure_parent_runs, get_or_create_experiment, update_parent_aggregates

    eid = get_or_create_experiment(client, name, tags={"grid": "fake"})
    rng = np.random.default_rng(0)
    folds = {"synth-textures": ["1", "2", "3", "4", "5"], "esc50": ["1", "2", "3", "4", "5"],
             "synth-commands": ["split"], "synth-concat": ["split"], "synth-speaker": ["split"]}
    variants = ["mamba-raw", "helix-raw", "helix-mel", "attention-raw"]
    # Trials deliberately not finished; anything absent from the loops below stays pending.
    special = {("synth-textures", "helix-mel", "4"): "running", ("synth-textures", "attention-raw", "2"): "diverged",
               ("synth-speaker", "attention-raw", "split"): "oom", ("synth-concat", "attention-raw", "split"): "planned_oom"}
    skip = {("synth-textures", "helix-mel", "5")} | {("esc50", v, f) for v in variants for f in "345"} \
        | {("esc50", "attention-raw", f) for f in "12"}
    sweep = FakeSweep(name, eid, folds, variants, {}, {}, {}, {})
    parents = ensure_parent_runs(client, eid, {(d, v): fs for d, fs in folds.items() for v in variants})  # as the driver
    for dataset, fs in folds.items():
        with_val = dataset == "synth-commands"
        for variant in variants:
            parent = parents[dataset, variant]
            for fold in fs:
                k = (dataset, variant, fold)
                if k in skip:
                    continue
                status = special.get(k, "finished")
                n_epochs = 2 if status == "running" else (1 if status in ("oom", "diverged") else 3)
                accs = [round(float(a), 4) for a in np.sort(rng.uniform(0.2, 0.9, n_epochs))]
                accs = accs[::-1] if fold == "3" else accs  # one fold peaks at epoch 1
                vals = [round(float(a), 4) for a in rng.uniform(0.2, 0.9, n_epochs)] if with_val else None
                if status == "planned_oom":
                    accs = []
                sweep.runs[k] = log_trial(client, eid, parent, dataset, variant, fold, status, accs, vals,
                                          epoch_seconds=5.0 if variant.startswith("attention") else 2.0,
                                          peak_mem_mb=1000.0 + 10 * len(sweep.runs))
                sweep.status[k] = status
                if status == "finished":
                    sweep.best[k] = max(accs)
                    if vals:
                        sweep.at_best_val[k] = accs[int(np.argmax(vals))]
            update_parent_aggregates(client, eid, dataset, variant)
    return sweep
