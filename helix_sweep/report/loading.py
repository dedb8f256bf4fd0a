"""MLflow runs -> a `results.Sweep`: the only module of the report that imports MLflow."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

from mlflow.tracking import MlflowClient

from helix_sweep.report.paper import DATASET_ORDER, VARIANT_ORDER
from helix_sweep.report.results import Cell, Sweep, Trial
from helix_sweep.sweep import schema as S
from helix_sweep.sweep.runs import parent_runs, trial_runs
from helix_sweep.sweep.trial_run import deliver_pending

log = logging.getLogger(__name__)

CURVE_METRICS = ("train_loss", "train_acc", "test_acc", "val_acc", "epoch_seconds", "peak_mem_mb")


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(order)}
    return sorted(set(names), key=lambda n: (rank.get(n, len(order)), n))


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    # One value per epoch; a resumed worker that re-logged an epoch leaves the later value.
    by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
    return sorted(by_step.items())


def load_sweep(client: MlflowClient, experiment: str, histories: bool = True) -> Sweep:
    """Read an experiment's trial and parent runs into a Sweep (histories for the curves optional)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise SystemExit(f"experiment={experiment!r} not found at {client.tracking_uri}; "
                         f"experiments there: {', '.join(names) or 'none'}")
    trials = []
    for r in trial_runs(client, exp.experiment_id):
        tags = r.data.tags
        missing = [k for k in (S.DATASET, S.VARIANT) if not tags.get(k)]
        if missing:
            log.warning("Skipping trial run %s: no %s tag", r.info.run_id, " or ".join(missing))
            continue
        t = Trial(run_id=r.info.run_id, key=tags.get(S.TRIAL_KEY, r.info.run_name or r.info.run_id),
                  dataset=tags[S.DATASET], variant=tags[S.VARIANT], fold=tags.get(S.FOLD, "split"),
                  status=tags.get(S.STATUS), params=dict(r.data.params), metrics=dict(r.data.metrics),
                  stop_reason=tags.get(S.STOP_REASON, ""))
        if histories:
            t.history = {k: _history(client, t.run_id, k) for k in CURVE_METRICS if k in t.metrics}
        trials.append(t)

    parents = {(p.data.tags.get(S.DATASET), p.data.tags.get(S.VARIANT)): p
               for p in parent_runs(client, exp.experiment_id)}
    pairs = {(t.dataset, t.variant) for t in trials} | {k for k in parents if None not in k}
    datasets = _ordered((d for d, _ in pairs), DATASET_ORDER)
    variants = _ordered((v for _, v in pairs), VARIANT_ORDER)
    seen_folds: dict[str, set[str]] = {}
    for t in trials:
        seen_folds.setdefault(t.dataset, set()).add(t.fold)

    cells = {}
    for d in datasets:
        for v in variants:
            parent = parents.get((d, v))
            planned = parent.data.tags.get(S.FOLDS_PLANNED) if parent else None
            mine = {t.fold: t for t in trials if t.dataset == d and t.variant == v}
            # no parent and no trial: the grid does not run this pair (e.g. mel on speaker ID): no folds
            folds = planned.split(",") if planned else (seen_folds.get(d) or ["split"]) if parent or mine else []
            folds = sorted(set(folds) | set(mine), key=S.fold_sort_key)
            cells[(d, v)] = Cell(d, v, folds, mine, dict(parent.data.metrics) if parent else {})
    return Sweep(exp.name, exp.experiment_id, client.tracking_uri, datasets, variants, cells, trials)


def load_from(uri: str, experiment: str | None = None, pending_root: Optional[Path] = None) -> Sweep:
    """The sweep at tracking `uri`: `experiment`, or the only experiment there with trial runs.

    With `pending_root` (the work directory's experiments folder), writes that trials logging to
    this host could not deliver at their end (the server was away: their final status among them)
    are delivered first, so no ended trial shows as running."""
    client = MlflowClient(uri)
    name = experiment or pick_experiment(client)
    if pending_root is not None:
        done, left = deliver_pending(uri, pending_root, name, same_host=True)
        if done or left:
            log.info("pending MLflow writes of %s: %d trials delivered, %d still waiting", name, done, left)
    return load_sweep(client, name)


def pick_experiment(client: MlflowClient) -> str:
    """The only experiment with trial runs; SystemExit listing them when there are none or several."""
    names = [e.name for e in client.search_experiments()
             if client.search_runs([e.experiment_id], S.tag_filter({S.KIND: S.KIND_TRIAL}), max_results=1)]
    if len(names) != 1:
        raise SystemExit("give experiment=NAME; experiments with trial runs at "
                         f"{client.tracking_uri}: {', '.join(sorted(names)) or 'none'}")
    return names[0]
