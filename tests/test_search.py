"""grid=tune: an Optuna search through Ray Tune that survives a killed driver (real Ray, real MLflow)."""

import pytest

from helix_sweep.sweep.tracking import stop_tracking_server
from sweep_process import kill_group, run, start, trial_runs, wait_for

# ASHA stops every trial at max_t = its last epoch; the pause after the final report is where that
# stop lands, so a run whose MLflow record were closed only after the report would never finish
ARGS = ["grid=tune", "train.epochs=1", "search.num_samples=4", "search.max_concurrent=2",
        "train.inject={sleep_before_finish: 5}"]
SEARCHED = ("lr", "weight_decay", "augment.mixup_alpha", "augment.noise", "augment.gain")  # MLflow param names


@pytest.mark.slow  # outside CI (suite time): the driver kill itself is covered by test_fault_tolerance
def test_tune_search_resumes_after_driver_kill(tmp_path):
    driver = start(tmp_path, *ARGS)
    try:
        finished = lambda: [r for r in trial_runs(tmp_path) if r.data.tags.get("status") == "finished"]
        try:
            wait_for(lambda: len(finished()) >= 2, 400, "2 finished search trials")
        finally:
            kill_group(driver)
        before = {r.data.tags["trial_key"]: r.info.run_id for r in finished()}
        proc = run(tmp_path, *ARGS)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs = trial_runs(tmp_path)
        keys = [r.data.tags["trial_key"] for r in runs]
        assert len(keys) == len(set(keys)) == 4, keys  # 4 samples in all, one MLflow run each
        configs = {tuple(r.data.params[k] for k in SEARCHED) for r in runs}
        assert len(configs) == 4  # no configuration suggested twice
        for key, run_id in before.items():  # finished samples were not rerun
            assert {r.info.run_id for r in runs if r.data.tags["trial_key"] == key} == {run_id}
        # the restored driver continued the saved Optuna study instead of starting a new one
        assert list((tmp_path / "experiments" / "helix-tune").glob("searcher-state-*.pkl"))
        # one epoch each: every sample ran to its end (none is left "running" or marked "stopped")
        assert [r.data.tags["status"] for r in runs] == ["finished"] * 4
    finally:
        stop_tracking_server(tmp_path)
