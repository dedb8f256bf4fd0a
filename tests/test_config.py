"""Config composition, overrides, errors before Ray/MLflow start, and dry-run trial counts."""

import subprocess
import sys

import pytest
import yaml

from helix_sweep.config import SEARCH_SPACES, ConfigError, grid_chain, load_config
from helix_sweep.run import plan_trials
from helix_sweep.sweep.grid import spread_pattern


def run_cli(*args):
    code = ("import sys; from helix_sweep.run import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules and 'mlflow' not in sys.modules, 'heavy import'; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,needle,valid", [
    (["grid=nope"], "unknown grid 'nope'", "smoke"),
    (["train.epoch=3"], "train.epoch", "train.epochs"),
    (["train.epochs=abc"], "train.epochs", "Integer"),
    (["datasets=[esc51]"], "esc51", "urbansound8k"),
    (["variants=[helix-rawr]"], "helix-rawr", "helix-raw"),
    (["model.attention_impl=flash"], "model.attention_impl='flash'", "naive"),
    (["grid=full", "folds=[11]"], "folds: [11]", "valid folds"),
    (["train.micro_batch=5"], "train.micro_batch=5", "divide"),
    (["nonsense"], "nonsense", "key=value"),
])
def test_config_errors_exit_nonzero_before_ray(args, needle, valid):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and valid in proc.stderr, proc.stderr


def test_dry_run_prints_trial_table_and_exits():
    proc = run_cli("dry_run=true", "datasets=[synth-commands]", "variants=[helix-raw,attention-mel]")
    assert proc.returncode == 0, proc.stderr
    assert "synth-commands/helix-raw/split" in proc.stdout and "synth-commands/attention-mel/split" in proc.stdout
    assert "2 trials" in proc.stdout


def _grid_file(name):
    """A grid's top-level settings with those of the grids it extends (shallow: enough to count trials)."""
    out = {}
    for n in grid_chain(name):
        out.update(yaml.safe_load((SEARCH_SPACES / "grids" / f"{n}.yaml").read_text()))
    return out


def _catalog():
    return yaml.safe_load((SEARCH_SPACES / "datasets.yaml").read_text())


def expected_count(grid: dict) -> int:
    """variants x datasets x folds, minus frontends a dataset does not run and the exclude rules."""
    cat = _catalog()
    n_variants = len(grid.get("variants", [])) + len(grid.get("frontends", ["raw", "mel"])) * (
        len(grid.get("attention_positions") or []) + len(grid.get("attention_counts") or []))
    total = 0
    for ds in grid["datasets"]:
        folds = cat[ds].get("folds") or [None]
        if grid.get("folds") and cat[ds].get("folds"):
            folds = [k for k in folds if k in grid["folds"]]
        frontends = cat[ds].get("frontends", ["raw", "mel"])
        share = sum(1 for _ in frontends) / 2  # variants come in raw/mel pairs
        total += int(n_variants * share) * len(folds)
    return total - len(grid.get("exclude", []))


@pytest.mark.parametrize("grid", ["smoke", "smoke-large", "full", "positions", "placement", "ratio", "tune"])
def test_dry_run_counts_follow_the_grid_files(grid):
    cfg, trials = plan_trials([f"grid={grid}"])
    assert len(trials) == expected_count(_grid_file(grid))
    assert len({t.key for t in trials}) == len(trials)
    assert {t.experiment for t in trials} == {f"helix-{grid}"}


def test_full_grid_exceptions():
    _, trials = plan_trials(["grid=full"])
    speaker = [t for t in trials if t.dataset in ("librispeech", "voxpopuli")]
    assert speaker and all(t.frontend == "raw" for t in speaker)
    oom = [t.key for t in trials if t.status == "planned_oom"]
    assert oom == ["voxpopuli/attention-raw/split"]  # HELIX at 300 s runs with SDPA (datasets.yaml)
    assert {t.model.attention_impl for t in trials if t.dataset == "voxpopuli"} == {"sdpa"}
    assert {t.model.attention_impl for t in trials if t.dataset == "esc50"} == {"naive"}
    # with naive attention forced from the command line the planner also rules HELIX out at 48 GB
    _, naive = plan_trials(["grid=full", "model.attention_impl=naive"])
    assert sorted(t.key for t in naive if t.status == "planned_oom") == [
        "voxpopuli/attention-raw/split", "voxpopuli/helix-raw/split"]
    assert next(t for t in trials if t.dataset == "voxpopuli").tokens == 30000
    assert {t.fold for t in trials if t.dataset == "urbansound8k"} == set(range(1, 11))


def test_narrowing_changes_the_experiment_name_and_is_stable():
    _, a = plan_trials(["grid=full", "datasets=[esc50]", "variants=[helix-raw]", "folds=[1,2]"])
    _, b = plan_trials(["grid=full", "datasets=[esc50]", "variants=[helix-raw]", "folds=[1,2]"])
    assert [t.key for t in a] == ["esc50/helix-raw/fold1", "esc50/helix-raw/fold2"]
    assert a[0].experiment == b[0].experiment != "helix-full"
    assert a[0].experiment.startswith("helix-full-")


def test_overrides_compose_and_dataset_train_overrides_apply():
    cfg, trials = plan_trials(["grid=full", "datasets=[speechcommands-concat]", "train.lr=0.001"])
    assert all(t.train.epochs == 24 and t.train.lr == 0.001 and t.pool_tokens == 100 for t in trials)
    _, trials = plan_trials(["grid=full", "datasets=[speechcommands-concat]", "train.epochs=3"])
    assert all(t.train.epochs == 3 for t in trials)  # the command line wins over the dataset's 24
    assert load_config(["train.augment.mixup=false"]).train.augment.mixup is False
    with pytest.raises(ConfigError):
        load_config(["train.augment.mixupp=false"])


def test_spread_pattern_rule():
    assert spread_pattern(6, 0) == "MMMMMM"
    assert spread_pattern(6, 1) == "MMMAMM"  # the HELIX pattern
    assert spread_pattern(6, 6) == "AAAAAA"
    assert [spread_pattern(6, k).count("A") for k in range(7)] == list(range(7))


@pytest.mark.parametrize("grid", ["placement", "ratio"])
def test_generated_patterns_are_parameter_matched(grid):
    from helix_sweep.models import build_classifier, count_params

    _, trials = plan_trials([f"grid={grid}", "datasets=[esc50]", "frontends=[raw]", "folds=[1]"])
    patterns = sorted({t.pattern for t in trials})
    assert len(patterns) == (6 if grid == "placement" else 7)
    if grid == "placement":
        assert patterns == sorted("".join("A" if i == p else "M" for i in range(6)) for p in range(6))
    counts = [count_params(build_classifier(p, "raw", 50)) for p in patterns]
    assert (max(counts) - min(counts)) / min(counts) <= 0.005


def test_missing_dataset_fails_before_any_trial_naming_the_prepare_command(tmp_path):
    proc = run_cli_full(f"workdir={tmp_path}", "grid=full", "datasets=[esc50]", "variants=[helix-raw]", "folds=[1]")
    assert proc.returncode == 2, proc.stderr
    assert "esc50" in proc.stderr and "python -m helix_sweep.data prepare esc50" in proc.stderr
    assert not (tmp_path / "mlflow").exists()  # no tracking server was started


def test_unreachable_tracking_server_fails_fast_naming_the_uri(tmp_path):
    proc = run_cli_full(f"workdir={tmp_path}", "datasets=[synth-commands]", "variants=[helix-mel]",
                        "tracking_uri=http://127.0.0.1:9")
    assert proc.returncode == 3
    assert "http://127.0.0.1:9" in proc.stdout + proc.stderr and "unavailable" in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("experiments/*/trials"))  # no trial was started


def run_cli_full(*args):
    """The real entry point, past the config checks (it may import Ray, but must not start trials)."""
    return subprocess.run([sys.executable, "-m", "helix_sweep.run", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["folds=[]"], "folds=[]"),
    (["train.lr=-0.001"], "train.lr=-0.001: must be > 0"),
    (["train.checkpoint_minutes=-1"], "train.checkpoint_minutes=-1.0: must be >= 0"),
    (["resources.gpus_per_worker=-1"], "resources.gpus_per_worker=-1: expected auto, a share of one GPU in (0, 1]"),
    (["resources.gpus_per_worker=1.5"], "or a whole number of GPUs >= 1"),
    (["max_failures=-1"], "max_failures=-1: must be >= 0"),
    (["search.num_samples=-1"], "search.num_samples=-1: must be >= 0"),
    (["train.augment.gain_min=1.3"], "train.augment.gain_min=1.3 > train.augment.gain_max=1.2"),
    (["model.num_heads=5"], "model.num_heads=5: must divide model.d_model=32"),
    (["datasets=[esc50"], "argument 'datasets=[esc50': cannot parse"),
    (["experiment=../x"], "must be a plain name"),
    (["experiment=/abs/x"], "must be a plain name"),
])
def test_bad_values_are_refused_naming_the_key(args, needle):
    with pytest.raises(ConfigError) as err:
        load_config(args)
    assert needle in str(err.value)


def test_bad_override_syntax_exits_2_without_a_traceback():
    proc = run_cli("datasets=[esc50", "dry_run=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "datasets=[esc50" in proc.stderr


def test_study_grids_run_without_positions_and_grid_positions_is_the_ablation():
    _, full = plan_trials(["grid=full"])
    _, positions = plan_trials(["grid=positions"])
    assert {t.model.pos_encoding for t in full} == {"none"}
    for grid in ("placement", "ratio"):
        assert {t.model.pos_encoding for t in plan_trials([f"grid={grid}"])[1]} == {"none"}
    # the ablation is the same study, trial for trial, with sinusoidal positions
    assert [t.key for t in positions] == [t.key for t in full]
    assert {t.model.pos_encoding for t in positions} == {"sinusoidal"}
    assert {t.experiment for t in positions} == {"helix-positions"}
    assert [t.status for t in positions] == [t.status for t in full]


def test_a_grid_that_extends_an_unknown_grid_is_refused(tmp_path, monkeypatch):
    import helix_sweep.config as config

    grids = tmp_path / "grids"
    grids.mkdir()
    (grids / "a.yaml").write_text("extends: b\n")
    (grids / "b.yaml").write_text("extends: a\n")
    (grids / "c.yaml").write_text("extends: nope\n")
    monkeypatch.setattr(config, "SEARCH_SPACES", tmp_path)
    with pytest.raises(ConfigError, match="loop"):
        config.grid_chain("a")
    with pytest.raises(ConfigError, match="extends unknown grid 'nope'"):
        config.grid_chain("c")
