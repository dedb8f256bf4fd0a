"""`python -m helix_sweep.run [grid=NAME] [key=value ...]`: run (or resume) a sweep.

Parsing and checks happen here, at the edge, before any Ray or MLflow process starts.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from helix_sweep.config import ConfigError, load_config, parse_overrides, to_yaml
from helix_sweep.sweep.grid import NARROWING_KEYS, datasets_read, expand_grid, name_experiment
from helix_sweep.training.packing import format_fraction


def trial_table(trials) -> str:
    """One row per trial, from its budget: `epochs` the epochs trained (of the schedule's length when
    train.stop_after_epochs truncates it); `scan` is model.scan_impl (what `auto` runs is decided on
    the worker's device and logged as the run's scan_impl param); `gpu prec` the precision it trains in
    on a GPU (train.precision, auto resolved by the plan; CPU trials run fp32); `plan` is its feasibility
    on one GPU of resources.gpu_memory_gb under its attention_impl and `micro x acc` the micro-batch x
    gradient accumulation it gets there (on CPU: train.micro_batch, or the whole batch); `workers` the
    DDP workers x the GPUs each asks for on a GPU cluster (a share such as 1/4: packed beside other
    trials on one GPU)."""
    head = ("trial", "variant", "pattern", "frontend", "dataset", "fold", "tokens", "pool", "epochs", "scan",
            "attn", "gpu prec", "workers", "plan", "micro x acc", "status")
    rows = [(t.key, t.variant, t.pattern, t.frontend, t.dataset, t.fold_label, str(t.tokens),
             str(t.pool_tokens or "all"),
             str(t.train.epochs) if t.train.stop_epoch == t.train.epochs else f"{t.train.stop_epoch}/{t.train.epochs}",
             t.model.scan_impl if "M" in t.pattern else "-", t.model.attention_impl if "A" in t.pattern else "-",
             t.budget.precision or t.train.precision, f"{t.resources.num_workers}x{format_fraction(t.budget.gpu_fraction)}gpu",
             f"{t.budget.feasibility}@{t.resources.gpu_memory_gb:g}GB",
             "-" if t.status != "run" else f"{t.budget.micro_batch} x {t.budget.grad_accum}", t.status)
            for t in trials]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def plan_trials(argv: list[str]):
    """Config + trial list, fully checked; raises ConfigError."""
    cfg = load_config(argv)
    cli = parse_overrides(argv)
    trials = name_experiment(cfg, expand_grid(cfg), narrowed=any(k in cli for k in NARROWING_KEYS))
    return cfg, trials


def check_data(trials) -> None:
    """Every real dataset a trial reads is prepared, from the source subset the trial names; raises
    ConfigError naming the prepare command. (The synthetic ones are made by the driver as Ray starts.)"""
    from helix_sweep.data import DatasetNotPrepared, require_prepared

    for root, dataset, subset in datasets_read(trials, synthetic=False):
        try:
            require_prepared(root, dataset, subset or None)
        except DatasetNotPrepared as exc:
            raise ConfigError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, trials = plan_trials(argv)
    except ConfigError as exc:
        print(f"helix_sweep: config error: {exc}", file=sys.stderr)
        return 2
    print(to_yaml(cfg))
    print(trial_table(trials))
    n_run = sum(t.status == "run" for t in trials)
    kept_out = {s: sum(t.status == s for t in trials) for s in ("planned_oom", "ruled_oom")}
    print(f"\n{len(trials)} trials ({n_run} to run, {kept_out['planned_oom']} planned oom, "
          f"{kept_out['ruled_oom']} ruled oom by the grid) "
          f"in experiment {trials[0].experiment}")
    if cfg.search.num_samples:
        print(f"search: {cfg.search.num_samples} Optuna (TPE, seed {cfg.search.seed}) samples of "
              f"{', '.join(cfg.search.space)} maximising {cfg.search.metric}" if cfg.search.mode == "max" else
              f"search: {cfg.search.num_samples} samples minimising {cfg.search.metric}")
    if cfg.dry_run:
        return 0
    from helix_sweep.sweep.tracking import TrackingUnavailable

    try:
        return run(cfg, trials)
    except ConfigError as exc:
        print(f"helix_sweep: {exc}", file=sys.stderr)
        return 2
    except TrackingUnavailable as exc:  # the given URI, or the work directory's own server failed to start
        print(f"helix_sweep: {exc}", file=sys.stderr)
        return 3


def run(cfg, trials) -> int:
    """The checks that need no process (the real datasets, a given tracking URI, the experiment's
    folder, its lock, its settings: a refused run writes nothing), then the sweep, holding the
    experiment's lock. MLflow's server (~10 s to start on a 2-core AVX-512 EPYC) starts first, while the driver
    imports Ray, makes the synthetic data and starts Ray."""
    from helix_sweep.sweep import experiment
    from helix_sweep.sweep.tracking import check_tracking_reachable, start_tracking_server

    check_data(trials)
    if cfg.tracking_uri:  # a server of the user's: refused at once, not after Ray has started (~10 s)
        check_tracking_reachable(cfg.tracking_uri)
    exp_dir = experiment.experiment_dir(cfg.workdir_path, trials[0].experiment, cfg.resume)
    with experiment.ExperimentLock(exp_dir):
        experiment.check_same_config(exp_dir, experiment.settings_record(to_yaml(cfg), [t.key for t in trials]))
        server = None if cfg.tracking_uri else start_tracking_server(cfg.workdir_path)
        compiling = compile_cpu_kernels(cfg, trials)
        try:
            from helix_sweep.sweep.driver import run_sweep  # imports Ray and MLflow: only when running

            return run_sweep(cfg, trials, exp_dir, server)
        finally:
            if compiling is not None:
                compiling.wait()  # long done: it only compiles


MODELS = Path(__file__).parent / "models"
CPU_KERNELS = "mixer_numba"  # the module of the numba-compiled kernels, cached in MODELS/__pycache__


def kernels_cached(models: Path = MODELS) -> bool:
    """Whether numba's cache holds the CPU kernels, written after their source last changed."""
    source = (models / f"{CPU_KERNELS}.py").stat().st_mtime
    return any(p.stat().st_mtime >= source for p in (models / "__pycache__").glob(f"{CPU_KERNELS}.*.nbi"))


def compile_cpu_kernels(cfg, trials) -> subprocess.Popen | None:
    """A local sweep that will train Mamba layers, with no compiled kernels cached (a fresh clone):
    compile them in a background process while the sweep starts, instead of in each of the first CPU
    trials at once (~5.5 s of CPU apiece on a 2-core Zen 5; on a local GPU machine it is done once, unused). A
    trial that starts first compiles them itself, as it would anyway; numba's cache takes either."""
    mamba = any("M" in t.pattern for t in trials if t.status == "run")
    if cfg.ray_address is not None or not mamba or kernels_cached():
        return None
    return subprocess.Popen([sys.executable, "-c", f"import helix_sweep.models.{CPU_KERNELS}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(main())
