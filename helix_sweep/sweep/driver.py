"""The sweep driver: the tracking server, Ray, one Tune trial per TrialSpec, the results table (the checks
that need no process come first, in helix_sweep.run).

Each Tune trial is a thin function that builds and fits a Ray Train trainer, or, for a trial of one
CPU worker on this driver's own local Ray, trains in its own actor (helix_sweep.sweep.trainable).
The Tune experiment lives in <workdir>/experiments/<experiment>; re-running the same command, or
`resume=<name or path>`, restores it: finished trials are not rerun.
"""

from __future__ import annotations

import csv
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import ray
from ray import tune

from helix_sweep.config import ConfigError, SweepConfig, TrialSpec
from helix_sweep.sweep import ray_runtime, runs, tracking, trial_run
from helix_sweep.sweep import schema as S
from helix_sweep.sweep.outage import is_outage
from helix_sweep.sweep.grid import datasets_read
from helix_sweep.sweep.schedule import order_longest_first
from helix_sweep.sweep.search import apply_sample, runs_of, sample_key, search_space, searcher_and_scheduler
from helix_sweep.sweep.trainable import end_run, train_trial, trial_dir_name, trial_resources, uses_gpu
from helix_sweep.training import format_fraction

log = logging.getLogger(__name__)


def make_data(trials: list[TrialSpec]) -> None:
    """Generate the synthetic datasets the trials read, once, here (parallel trials would race to);
    the real ones were checked before (run.check_data)."""
    from helix_sweep.training import require_prepared

    for root, dataset, subset in datasets_read(trials, synthetic=True):
        require_prepared(root, dataset, subset or None)


def lean_train(cfg: SweepConfig) -> bool:
    """Trials fit ray_runtime's lean TorchTrainer on a local Ray (the driver's own, not a cluster) for a
    grid (a search's scheduler stops trials, and only a stopped trial or a lost node needs the
    placement-group cleaner)."""
    return cfg.ray_address is None and cfg.search.num_samples == 0


def trial_name(trial) -> str:
    """Tune's table and directories show the trial key."""
    return trial_dir_name(sample_key(trial.config["trial_key"], trial.config))


AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml")  # where `ray up` puts the cluster YAML on the head


def autoscaler_gpus(config_path: Path = AUTOSCALER_CONFIG) -> float:
    """GPUs the autoscaler can bring up: sum over worker types of max_workers x GPUs per node
    (capped by the cluster's max_workers), from the cluster YAML on the head; 0 when not on one."""
    import yaml

    path = config_path.expanduser()
    if not path.is_file():
        return 0.0
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
        types = cfg.get("available_node_types") or {}
        per_node = sorted(((float((t.get("resources") or {}).get("GPU", 0)), int(t.get("max_workers", 0)))
                           for name, t in types.items() if name != cfg.get("head_node_type")), reverse=True)
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:
        log.warning("cannot read the autoscaler config %s: %s", path, exc)
        return 0.0
    nodes_left, gpus = int(cfg.get("max_workers", sum(n for _, n in per_node))), 0.0
    for gpu, n in per_node:  # the GPU-richest types first, within the cluster's node limit
        take = min(n, nodes_left)
        gpus, nodes_left = gpus + gpu * take, nodes_left - take
    return gpus


def cluster_gpus(autoscaling: bool = True) -> tuple[float, float]:
    """(GPUs in the cluster now, GPUs it can reach). A launcher cluster scaling GPU workers from
    zero has none at the start: the second figure then comes from the autoscaler's config (the
    cluster YAML on the head, or what the cluster reports to the GCS, as KubeRay does). A local Ray
    (autoscaling=False) cannot grow."""
    now = float(ray.cluster_resources().get("GPU", 0))
    if not autoscaling:
        return now, now
    reported = 0.0
    try:  # Ray's private state API, as Ray Train uses it to check a worker group can ever fit
        from ray._private.state import state

        reported = float((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0))
    except Exception as exc:  # moved or unavailable in this Ray version
        log.debug("no cluster config in the GCS: %s", exc)
    return now, max(now, reported, autoscaler_gpus())


def resolve_use_gpu(trials: list[TrialSpec], gpus: float) -> list[TrialSpec]:
    """Fix each trial's use_gpu to "true"/"false" once, in the driver, so every trial (and every
    restart of one) asks Ray for the same resources, including while GPU workers are still starting."""
    return [replace(t, resources=replace(t.resources, use_gpu=str(uses_gpu(t.resources, gpus)).lower()))
            for t in trials]


def max_concurrent(cfg: SweepConfig, trials: list[TrialSpec], gpus: float | None = None,
                   cpus: float | None = None) -> int:
    """As many trials as the cluster's GPUs (or CPUs, for CPU trials) can hold at once: the
    smallest trial's share (workers x GPU share each) decides, so the cap never leaves a GPU idle
    while trials wait; Ray queues what does not fit. gpus/cpus default to what the cluster has (or
    can reach)."""
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    gpus = cluster_gpus()[1] if gpus is None else gpus
    cpus = float(ray.cluster_resources().get("CPU", 1)) if cpus is None else cpus
    on_gpu = [t for t in trials if uses_gpu(t.resources, gpus)]
    if on_gpu:  # packed trials (a GPU share < 1) let more trials run than there are GPUs
        return max(1, int(gpus / min(t.resources.num_workers * t.budget.gpu_fraction for t in on_gpu) + 1e-9))
    return max(1, int(cpus // min(t.resources.num_workers * t.resources.cpus_per_worker for t in trials)))


def record_planned_oom(client, experiment_id: str, trials: list[TrialSpec]) -> None:
    """Trials kept out get a run with their status and no GPU time: planned_oom (the plan predicts out of
    memory) or ruled_oom (a grid rule); the reason is the stop_reason tag, the settings the params."""
    for t in trials:
        if t.status not in S.NOT_LAUNCHED or runs.find_trial_run(client, experiment_id, t.key) is not None:
            continue
        run = runs.create_trial_run(
            client, experiment_id, t.key, t.dataset, t.variant, t.fold_label,
            tags={S.STATUS: t.status, S.RESUMES: "0", S.STOP_REASON: t.budget.oom_reason},
            params=S.trial_params(t))
        client.set_terminated(run.info.run_id, S.run_state(t.status))
        runs.update_parent_aggregates(client, experiment_id, t.dataset, t.variant)


def run_sweep(cfg: SweepConfig, trials: list[TrialSpec], exp_dir: Path, server: Future | None = None) -> int:
    """Run (or continue) the experiment in exp_dir, whose lock the caller holds and whose settings it
    checked (helix_sweep.run). `server`: the work directory's MLflow server already starting
    (tracking.start_tracking_server), if any."""
    name = trials[0].experiment  # the MLflow experiment (the folder may be a resumed path's)
    runnable = [t for t in trials if t.status == "run"]
    own_ray = not ray.is_initialized()  # a local Ray started here (not a cluster, nor a caller's Ray)
    with ThreadPoolExecutor(2) as pool:  # the MLflow server (a subprocess) and the synthetic data, while Ray starts
        if server is None and not cfg.tracking_uri:
            server = pool.submit(tracking.ensure_tracking_server, cfg.workdir_path)
        made = pool.submit(make_data, trials)
        if runnable and own_ray:
            # "local": a fresh local runtime, never someone else's cluster on the same machine
            ray.init(address=cfg.ray_address or "local", log_to_driver=True,
                     runtime_env=ray_runtime.runtime_env(), **ray_runtime.init_options(lean_train(cfg)))
        made.result()
        uri = cfg.tracking_uri or server.result()
    tracking.check_tracking_reachable(uri)  # gone while Ray started? TrackingUnavailable: run.main says so, exit 3
    print(f"MLflow tracking at {uri} (runs table: {uri}/#/experiments/<id>/runs?workflowType=machine_learning)")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = runs.get_or_create_experiment(client, name)
    folds: dict[tuple[str, str], list[str]] = {}
    for t in trials:  # every parent up front, so unstarted folds show as pending
        folds.setdefault((t.dataset, t.variant), []).append(t.fold_label)
    parents = runs.ensure_parent_runs(client, experiment_id, folds)
    if cfg.search.num_samples > 0:  # a search's parent closes once its samples ended, not at its first
        for parent_id in parents.values():
            client.set_tag(parent_id, S.SAMPLES_PLANNED, str(cfg.search.num_samples))
    record_planned_oom(client, experiment_id, trials)
    deliver_pending(uri, exp_dir, name)  # final tags an earlier run's trials could not deliver
    if not runnable:
        print("nothing to run: every trial is kept out (planned_oom or ruled_oom)")
        return 0
    gpus_now, gpus = cluster_gpus(autoscaling=cfg.ray_address is not None)  # a local Ray cannot grow
    runnable = resolve_use_gpu(runnable, gpus)
    runnable = order_longest_first(runnable)  # the 40-hour trials start first, short ones fill in
    concurrent = max_concurrent(cfg, runnable, gpus)
    log.info("cluster: %g GPUs now, %g reachable; %d trials, up to %d at once; micro-batches @ GPU share: %s",
             gpus_now, gpus, len(runnable), concurrent,
             ", ".join(f"{t.key}={t.budget.micro_batch}x{t.budget.grad_accum}@{format_fraction(t.budget.gpu_fraction)}"
                       for t in runnable[:8])
             + (" ..." if len(runnable) > 8 else ""))
    # read by each trial as it starts, from this driver (see train_trial), not frozen into Tune's state
    where = {"tracking": {"uri": uri, "finish_wait_s": cfg.tracking_wait_s}, "storage_path": str(exp_dir / "trials"),
             "max_failures": cfg.max_failures, "lean_train": own_ray and lean_train(cfg)}
    param_space: dict = {}
    # reuse_actors: a finished trial's Tune actor (a process that has imported torch, MLflow and
    # this package) runs the next trial instead of a new one being started; train_trial keeps no state
    tune_config = dict(max_concurrent_trials=concurrent, trial_name_creator=trial_name,
                       trial_dirname_creator=trial_name, reuse_actors=True)
    if cfg.search.num_samples > 0:
        if len(runnable) != 1:
            raise ConfigError(f"a search (search.num_samples={cfg.search.num_samples}) runs over one base trial; "
                              f"the grid gives {len(runnable)}: narrow it with datasets=[..] variants=[..] folds=[..]")
        searcher, scheduler = searcher_and_scheduler(cfg.search, runnable[0].train.stop_epoch)
        param_space.update({"trial_key": runnable[0].key, **search_space(cfg.search)})
        tune_config.update(search_alg=searcher, scheduler=scheduler, num_samples=cfg.search.num_samples)
        tune_config.pop("max_concurrent_trials")  # the ConcurrencyLimiter caps a search
    else:
        param_space["trial_key"] = tune.grid_search([t.key for t in runnable])
    by_key = {t.key: t for t in runnable}
    specs = tune.with_parameters(train_trial, specs=by_key, where=where)
    # a Tune trial that waits on its Train run holds no CPU; one that trains in its actor, the worker's
    trainable = tune.with_resources(specs, lambda config: trial_resources(
        by_key[config["trial_key"]], where, by_key[config["trial_key"]].resources.use_gpu == "true"))
    run_config = tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent),
                                failure_config=tune.FailureConfig(max_failures=cfg.max_failures))
    if tune.Tuner.can_restore(str(exp_dir)):
        log.info("restoring experiment %s", exp_dir)
        tuner = restore(exp_dir, trainable, param_space, where)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, run_config=run_config,
                           tune_config=tune.TuneConfig(**tune_config))
    grid = tuner.fit()
    deliver_pending(uri, exp_dir, name)  # what workers could not deliver at their end
    close_ended_runs(uri, {t.key: t for t in runnable}, exp_dir / "trials", grid)
    try:
        table = results_table(client, experiment_id, trials)
    except Exception as exc:
        if not is_outage(exc):
            raise
        table = None
        print(f"helix_sweep: MLflow at {uri} became unreachable ({str(exc).splitlines()[0][:300]}); no results "
              f"table. Final statuses not yet in MLflow wait in the trials' {trial_run.PENDING_FILE} files: run "
              f"the same command (or resume={exp_dir.name}) or python -m helix_sweep.report once it is back.")
    if table is not None:
        write_results(exp_dir, table)
        print(format_table(table))
    errored = [r for r in grid if r.error is not None]
    for result in errored:
        print(f"errored: {sample_key(result.config['trial_key'], result.config)}: {error_summary(result.error)}")
    if table is None:
        return 3
    print(f"\nresults: {exp_dir / 'results.md'}  ·  MLflow: {uri}")
    return 1 if errored else 0


def restore(exp_dir: Path, trainable, param_space: dict, where: dict):
    """Tuner.restore with the same param_space: a search's new samples take its constants (the trial
    key) from it. Tune refuses one whose keys changed: an experiment started before `where` left the
    param_space (it held the tracking URI, storage path and max_failures) gets them back, unused."""
    def attempt(space: dict):
        return tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=space)
    try:
        return attempt(param_space)
    except ValueError as exc:
        if "param_space" not in str(exc):
            raise
        log.info("experiment %s was started with the tracking settings in its param_space", exp_dir)
        return attempt({**param_space, "tracking": {"uri": where["tracking"]["uri"]},
                        "storage_path": where["storage_path"], "max_failures": where["max_failures"]})


def error_summary(error: BaseException) -> str:
    """The root exception's line out of Ray's wrapped worker traceback (ours, not Ray's wrapper)."""
    lines = [ln.strip() for ln in str(error).splitlines()]
    raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln) and not ln.startswith("ray.")]
    return (raised or [ln for ln in lines if ln] or [repr(error)])[-1][:1000]


def deliver_pending(uri: str, exp_dir: Path, experiment_name: str) -> None:
    done, left = trial_run.deliver_pending(uri, exp_dir, experiment_name)
    if done or left:
        log.info("pending MLflow writes: %d trials delivered, %d still waiting", done, left)


def close_ended_runs(uri: str, specs: dict[str, TrialSpec], trials_dir: Path, grid) -> None:
    """Every ended trial's run ends too: errored trials (whatever the reason) as failed with the error,
    trials the scheduler (ASHA) stopped early as stopped. Only runs still tagged running change."""
    for result in grid:
        key = sample_key(result.config["trial_key"], result.config)
        if result.error is not None:
            status, reason = S.FAILED, error_summary(result.error)
        elif (result.metrics or {}).get("trial_status") == S.RUNNING:
            status, reason = S.STOPPED, ""
        else:
            continue
        spec = apply_sample(specs[result.config["trial_key"]], result.config)
        end_run(uri, spec, trials_dir / trial_dir_name(key), status, reason)


def results_table(client, experiment_id: str, trials: list[TrialSpec]) -> list[dict]:
    """Best test accuracy per (dataset, variant): mean +- std over folds, from the trials' runs (in a
    search, each trial's best finished sample)."""
    by_key = {r.data.tags.get(S.TRIAL_KEY): r for r in runs.trial_runs(client, experiment_id)}
    cells: dict[tuple[str, str], list] = {}
    for t in trials:
        cells.setdefault((t.dataset, t.variant), []).append(runs_of(t.key, by_key))
    rows = []
    for (dataset, variant), per_trial in cells.items():
        done = [best for rs in per_trial if (best := runs.best_finished(rs))]
        mean, std = S.mean_std([r.data.metrics[S.BEST_TEST_ACC] * 100 for r in done])
        statuses = sorted({r.data.tags.get(S.STATUS) for rs in per_trial for r in rs}
                          | ({"pending"} if any(not rs for rs in per_trial) else set()))
        rows.append({"dataset": dataset, "variant": variant, "trials": len(per_trial), "finished": len(done),
                     "best_test_acc_mean": mean, "best_test_acc_std": std, "status": "/".join(statuses)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| dataset | variant | best test acc (%) | trials | status |", "|---|---|---|---|---|"]
    for r in rows:
        m, s = r["best_test_acc_mean"], r["best_test_acc_std"]
        acc = "—" if m is None else f"{m:.2f}" + (f" ± {s:.2f}" if s is not None else "")
        lines.append(f"| {r['dataset']} | {r['variant']} | {acc} | {r['finished']}/{r['trials']} | {r['status']} |")
    return "\n".join(lines)


def write_results(exp_dir: Path, rows: list[dict]) -> None:
    exp_dir.mkdir(parents=True, exist_ok=True)
    with open(exp_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (exp_dir / "results.md").write_text(format_table(rows) + "\n")
