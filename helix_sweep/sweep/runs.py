"""A sweep's runs in MLflow: its experiment, the (dataset, variant) parent runs with their fold
aggregates, and the trial runs (created, found, listed). Names and values: `schema`.

Every function takes an `MlflowClient` and an experiment id, so the driver, the rank-0 workers and
the report read and write the same runs the same way.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from helix_sweep.sweep import schema as S

log = logging.getLogger(__name__)


def get_or_create_experiment(client: MlflowClient, name: str, tags: dict[str, str] | None = None) -> str:
    """The id of experiment `name`, created when missing (tolerates a concurrent create).

    Tags it as a model-training experiment so the UI lists its runs, plus any `tags` given
    (e.g. the grid name); a deleted experiment of that name is restored.
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            experiment_id = client.create_experiment(name)
        except MlflowException:  # created by another process meanwhile (RESOURCE_ALREADY_EXISTS)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            experiment_id = exp.experiment_id
    else:
        experiment_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            log.info("Restoring deleted MLflow experiment %r (%s)", name, experiment_id)
            client.restore_experiment(experiment_id)
    current = exp.tags if exp is not None else {}
    for key, value in {S.EXPERIMENT_KIND_TAG[0]: S.EXPERIMENT_KIND_TAG[1], **(tags or {})}.items():
        if current.get(key) != value:
            client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


def _search_all(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> list:
    """Every run of the experiment with these tag values (all result pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=S.tag_filter(tags), max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# --------------------------------------------------------------------------------------------
# Parent runs and fold aggregates
# --------------------------------------------------------------------------------------------


# A parent run created concurrently elsewhere carries its creator's start_time (stamped before the
# request) but becomes visible only when that request lands: a creator waits this long past its own
# start, and at least three of its own create latencies, before it picks the oldest parent.
PARENT_SETTLE_S = 0.25


def _parents_by_pair(client: MlflowClient, experiment_id: str) -> dict[tuple[str, str], list]:
    """Live parent runs per (dataset, variant), oldest first (start_time, then run id)."""
    found: dict[tuple[str, str], list] = {}
    for r in sorted(parent_runs(client, experiment_id), key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        found.setdefault((r.data.tags.get(S.DATASET), r.data.tags.get(S.VARIANT)), []).append(r)
    return found


def ensure_parent_runs(client: MlflowClient, experiment_id: str,
                       planned: dict[tuple[str, str], Sequence[str | int] | None]) -> dict[tuple[str, str], str]:
    """The run id of each (dataset, variant) parent run in `planned`, created on first use (idempotent).

    `planned` maps (dataset, variant) to its planned folds, or None: the folds are recorded in the
    tag `folds_planned` ("1,2,3,4,5" or "split"), so the report shows unstarted folds as pending and
    `update_parent_aggregates` closes the parent once they are all finished. The driver creates every
    parent before its trials start. Processes creating the same parent at once each create one, wait
    until every earlier-stamped one is visible (PARENT_SETTLE_S), keep the oldest and delete their
    own otherwise, so one parent survives and every caller gets its id.
    """
    found = _parents_by_pair(client, experiment_id)
    created: dict[tuple[str, str], Any] = {}
    settled_at = 0.0
    for dataset, variant in planned:
        if not found.get((dataset, variant)):
            began = time.time()
            created[dataset, variant] = client.create_run(
                experiment_id, run_name=S.parent_run_name(dataset, variant),
                tags={S.KIND: S.KIND_PARENT, S.DATASET: dataset, S.VARIANT: variant})
            settle = max(PARENT_SETTLE_S, 3 * (time.time() - began))
            settled_at = max(settled_at, created[dataset, variant].info.start_time / 1000 + settle)
    if created:
        time.sleep(max(0.0, settled_at - time.time()))
        found = _parents_by_pair(client, experiment_id)
    ids = {}
    for pair, folds in planned.items():
        oldest = found.get(pair, [created.get(pair)])[0]  # own run only if it vanished meanwhile
        ids[pair] = oldest.info.run_id
        own = created.get(pair)
        if own is not None and own.info.run_id != ids[pair]:
            log.info("Parent run for %s/%s created concurrently; keeping %s", *pair, ids[pair])
            client.delete_run(own.info.run_id)
        if folds is not None:
            planned_tag = ",".join(str(f) for f in folds)
            if oldest.data.tags.get(S.FOLDS_PLANNED) != planned_tag:
                client.set_tag(ids[pair], S.FOLDS_PLANNED, planned_tag)
    return ids


def get_or_create_parent_run(client: MlflowClient, experiment_id: str, dataset: str, variant: str,
                             folds: Sequence[str | int] | None = None) -> str:
    """The run id of one (dataset, variant) parent run: `ensure_parent_runs` for a single pair."""
    return ensure_parent_runs(client, experiment_id, {(dataset, variant): folds})[dataset, variant]


def parent_runs(client: MlflowClient, experiment_id: str) -> list:
    return _search_all(client, experiment_id, {S.KIND: S.KIND_PARENT})


def update_parent_aggregates(client: MlflowClient, experiment_id: str, dataset: str, variant: str,
                             n_folds_planned: int | None = None) -> dict[str, Any]:
    """Recompute and log the parent run's fold aggregates over the finished trial runs.

    Call it whenever a trial of (dataset, variant) ends, whatever its status. Logs on the parent
    (step = number of finished folds, so its history shows the aggregate as folds came in; nothing is
    logged when the figures did not change): best_test_acc_mean, best_test_acc_std (sample std,
    ddof=1, only when n >= 2), n_folds_done, and test_acc_at_best_val_mean/_std when every finished
    trial has a validation figure. A fold with several finished runs (a search's samples, which share
    their base trial's fold) counts once, by its best run. The parent run is closed once every planned
    fold (the parent's `folds_planned` tag) has ended: FINISHED when all finished, FAILED when some
    ended otherwise (oom, diverged, failed, planned_oom); a search's parent (its `samples_planned`
    tag) once that many samples ended, stopped by the scheduler included: FINISHED when one finished.
    `n_folds_planned` instead closes it as FINISHED once that many folds finished.
    Returns {"parent_run_id", "n_folds_done", "best_test_acc_mean", "best_test_acc_std",
    "test_acc_at_best_val_mean", "test_acc_at_best_val_std", "folds"}; absent figures are None.
    """
    parent_id = get_or_create_parent_run(client, experiment_id, dataset, variant)
    trials = child_runs(client, experiment_id, dataset, variant)
    by_fold: dict[str, list] = {}
    for r in trials:
        by_fold.setdefault(r.data.tags.get(S.FOLD, ""), []).append(r)
    done = [best for fold in sorted(by_fold, key=S.fold_sort_key) if (best := best_finished(by_fold[fold]))]
    figures: dict[str, Any] = {"parent_run_id": parent_id, S.N_FOLDS_DONE: len(done)}
    for metric in S.AGGREGATED:  # a validation figure only when every finished fold has one
        values = [r.data.metrics[metric] for r in done if metric in r.data.metrics]
        mean, std = S.mean_std(values) if len(values) == len(done) else (None, None)
        figures.update({S.mean_name(metric): mean, S.std_name(metric): std})
    figures["folds"] = [r.data.tags.get(S.FOLD) for r in done]

    parent = client.get_run(parent_id)
    now, step = int(time.time() * 1000), len(done)
    metrics = [Metric(S.N_FOLDS_DONE, float(len(done)), now, step)]
    metrics += [Metric(k, float(v), now, step) for k, v in figures.items()
                if k.endswith(("_mean", "_std")) and v is not None]
    if any(parent.data.metrics.get(m.key) != m.value for m in metrics):
        client.log_batch(parent_id, metrics=metrics)
    folds_done = ",".join(str(f) for f in figures["folds"])
    if parent.data.tags.get(S.FOLDS_DONE) != folds_done:
        client.set_tag(parent_id, S.FOLDS_DONE, folds_done)

    planned = parent.data.tags.get(S.FOLDS_PLANNED)
    samples = parent.data.tags.get(S.SAMPLES_PLANNED)
    ended = {r.data.tags.get(S.FOLD): r.data.tags.get(S.STATUS) for r in trials
             if r.data.tags.get(S.STATUS) in S.TERMINAL_STATUSES}
    state = None
    if n_folds_planned is not None:
        state = "FINISHED" if len(done) >= n_folds_planned else None
    elif samples:
        samples_ended = [r for r in trials if r.data.tags.get(S.STATUS) in S.TERMINAL_STATUSES | {S.STOPPED}]
        if len(samples_ended) >= int(samples):
            state = "FINISHED" if done else "FAILED"
    elif planned and all(f in ended for f in planned.split(",")):
        state = "FINISHED" if len(done) == len(planned.split(",")) else "FAILED"
    if state and parent.info.status != state:
        client.set_terminated(parent_id, state)
    return figures


def best_finished(trial_runs: Sequence):
    """The finished run with the highest best test accuracy (a fold's, a search's samples), or None."""
    finished = [r for r in trial_runs if r.data.tags.get(S.STATUS) == S.FINISHED and S.BEST_TEST_ACC in r.data.metrics]
    return max(finished, key=lambda r: r.data.metrics[S.BEST_TEST_ACC], default=None)


# --------------------------------------------------------------------------------------------
# Trial runs
# --------------------------------------------------------------------------------------------


def create_trial_run(client: MlflowClient, experiment_id: str, trial_key: str, dataset: str, variant: str,
                     fold: str | int, tags: dict[str, str] | None = None, params: dict[str, Any] | None = None):
    """Create a trial's run under its (dataset, variant) parent, named after its key; returns the Run."""
    parent = get_or_create_parent_run(client, experiment_id, dataset, variant)
    run = client.create_run(experiment_id, run_name=trial_key, tags={
        S.PARENT_RUN_ID: parent, **S.trial_tags(trial_key, dataset, variant, fold), **(tags or {})})
    if params:
        client.log_batch(run.info.run_id, params=[Param(k, S.param_value(v)) for k, v in params.items()])
    return run


def find_trial_run(client: MlflowClient, experiment_id: str, trial_key: str):
    """The latest started run of a trial, or None."""
    found = client.search_runs([experiment_id], filter_string=S.tag_filter({S.TRIAL_KEY: trial_key}),
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def child_runs(client: MlflowClient, experiment_id: str, dataset: str, variant: str) -> list:
    """Trial runs of (dataset, variant), one per trial_key (the latest started if duplicated)."""
    return latest_per_trial(_search_all(client, experiment_id,
                                        {S.KIND: S.KIND_TRIAL, S.DATASET: dataset, S.VARIANT: variant}))


def trial_runs(client: MlflowClient, experiment_id: str) -> list:
    """Every trial run of an experiment, one per trial_key (the latest started if duplicated)."""
    return latest_per_trial(_search_all(client, experiment_id, {S.KIND: S.KIND_TRIAL}))


def latest_per_trial(runs: Sequence) -> list:
    """Keep one run per `trial_key` tag: a trial must have exactly one run, so warn on duplicates."""
    by_key: dict[str, Any] = {}
    for r in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        key = r.data.tags.get(S.TRIAL_KEY, r.info.run_id)
        if key in by_key:
            log.warning("Two MLflow runs for trial %s (%s, %s); using the later one",
                        key, by_key[key].info.run_id, r.info.run_id)
        by_key[key] = r
    return list(by_key.values())
