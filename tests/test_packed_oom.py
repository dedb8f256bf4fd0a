"""The Train worker's side of a packed trial running out of memory (helix_sweep.sweep.worker), in
process against a real MLflow server: on a share of a GPU the out-of-memory is not terminal (nothing
committed, the run left open with the reason in its packed_oom tag, for the Tune trial's refit on a
whole GPU); the refit reopens the same run, and out of memory there ends it as oom, the packed_oom
note kept. The whole path through Ray on a fake GPU is the slow tests/test_packing_sweep.py; this
part of it broke once unseen (a note written through a removed method crashed the packed trial)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from helix_sweep.run import plan_trials
from helix_sweep.sweep import schema as S
from helix_sweep.sweep.driver import resolve_use_gpu
from helix_sweep.sweep.trainable import on_whole_gpu
from helix_sweep.sweep.trial_run import TrialRun
from helix_sweep.sweep.worker import RayMlflowReporter, packed
from helix_sweep.training import Progress
from mlflow_server import mlflow_server  # noqa: F401  (session fixture: a real server)

REASON = "out of memory at 157 tokens/clip, micro-batch 32: CUDA out of memory. Tried to allocate 2.00 GiB"


def opened(spec, uri: str, run_dir) -> RayMlflowReporter:
    """Rank 0's reporter with its run opened, as after start() (run_id found again by the trial key)."""
    reporter = RayMlflowReporter(spec, {"uri": uri, "run_dir": str(run_dir), "finish_wait_s": 10.0}, rank=0)
    reporter.run = TrialRun(uri, spec.experiment, spec.key, spec.dataset, spec.variant, spec.fold_label,
                            run_dir=run_dir)
    assert reporter.run.open({"variant": spec.variant})
    reporter.reported = True  # its epochs were reported: finish() has nothing more for Ray Train
    return reporter


def test_packed_oom_leaves_the_run_open_and_the_whole_gpu_refit_ends_it(mlflow_server, tmp_path):
    _, trials = plan_trials(["grid=full", "datasets=[esc50]", "folds=[1]", "variants=[helix-mel]",
                             "resources.gpus_per_worker=0.5", "plan.calibration=none"])
    [spec] = resolve_use_gpu(trials, 1)
    spec = replace(spec, experiment=f"packed-oom-{tmp_path.name}")
    assert packed(spec) and not packed(on_whole_gpu(spec))
    client = MlflowClient(mlflow_server.uri)
    oom = Progress(epoch=1, status=S.OOM)
    trial = SimpleNamespace(stop_reason=REASON)

    share = opened(spec, mlflow_server.uri, tmp_path / "share")
    share.commit({}, None, oom)  # returns before any checkpoint or Ray Train report
    assert share.retried_on_whole_gpu(oom, trial)
    share.finish(oom, trial)
    assert not share.closed and share.run.flush()
    run = client.get_run(share.run.run_id)
    assert run.info.status == "RUNNING" and run.data.tags[S.STATUS] == S.RUNNING
    assert run.data.tags[S.PACKED_OOM] == f"out of memory on 1/2 of a GPU, retried on a whole GPU: {REASON}"

    whole = opened(on_whole_gpu(spec), mlflow_server.uri, tmp_path / "whole")
    assert whole.run.run_id == share.run.run_id  # the refit logs into the same run
    assert not whole.retried_on_whole_gpu(oom, trial)
    whole.finish(oom, trial)
    assert whole.closed
    run = client.get_run(share.run.run_id)
    assert run.info.status == S.run_state(S.OOM) and run.data.tags[S.STATUS] == S.OOM
    assert run.data.tags[S.STOP_REASON] == REASON and S.PACKED_OOM in run.data.tags
