"""Config composition, overrides, errors before Ray/MLflow start, and dry-run trial counts."""

import json
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


# main() on each argv in turn, in one fresh interpreter (each case in a process of its own cost ~2.5 s
# of imports): its return code, what it printed, and whether Ray or MLflow was imported by then
_MAIN_EACH = """
import contextlib, io, json, sys
from helix_sweep.run import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
                    "heavy": [m for m in ("ray", "mlflow") if m in sys.modules]})
print(json.dumps(results))
"""


def run_main_each(cases: list[list[str]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", _MAIN_EACH, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


CONFIG_ERRORS = [
    (["grid=nope"], "unknown grid 'nope'", "smoke"),
    (["train.epoch=3"], "train.epoch", "train.epochs"),
    (["train.epochs=abc"], "train.epochs", "Integer"),
    (["datasets=[esc51]"], "esc51", "urbansound8k"),
    (["variants=[helix-rawr]"], "helix-rawr", "helix-raw"),
    (["model.attention_impl=flash"], "model.attention_impl='flash'", "naive"),
    (["grid=full", "folds=[11]"], "folds: [11]", "valid folds"),
    (["train.micro_batch=5"], "train.micro_batch=5", "divide"),
    (["nonsense"], "nonsense", "key=value"),
]
DRY_RUN = ["dry_run=true", "datasets=[synth-commands]", "variants=[helix-raw,attention-mel]"]


@pytest.fixture(scope="module")
def cli_results() -> dict[tuple[str, ...], dict]:
    cases = [args for args, _, _ in CONFIG_ERRORS] + [DRY_RUN]
    return {tuple(args): result for args, result in zip(cases, run_main_each(cases))}


@pytest.mark.parametrize("args,needle,valid", CONFIG_ERRORS)
def test_config_errors_exit_nonzero_before_ray(cli_results, args, needle, valid):
    result = cli_results[tuple(args)]
    assert result["rc"] == 2 and not result["heavy"], result
    assert needle in result["stderr"] and valid in result["stderr"], result["stderr"]


def test_dry_run_prints_trial_table_and_exits(cli_results):
    result = cli_results[tuple(DRY_RUN)]
    assert result["rc"] == 0 and not result["heavy"], result
    for key in ("synth-commands/helix-raw/split", "synth-commands/attention-mel/split", "2 trials"):
        assert key in result["stdout"], result["stdout"]


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
    # HELIX at 300 s runs with SDPA (datasets.yaml), and the plan says pure attention fits there too
    # (slow): only the grid's rule keeps it out, as its own state with its own reason
    assert [t.key for t in trials if t.status == "planned_oom"] == []
    [ruled] = [t for t in trials if t.status == "ruled_oom"]
    assert ruled.key == "voxpopuli/attention-raw/split" and ruled.budget.feasibility == "slow"
    assert ruled.budget.oom_reason.startswith("grid rule: the paper's Table 1") and ruled.budget.planned_oom == "rule"
    assert {t.model.attention_impl for t in trials if t.dataset == "voxpopuli"} == {"sdpa"}
    assert {t.model.attention_impl for t in trials if t.dataset == "esc50"} == {"naive"}
    # with naive attention forced from the command line the plan predicts OOM for both at 48 GB: planned_oom
    _, naive = plan_trials(["grid=full", "model.attention_impl=naive"])
    assert sorted(t.key for t in naive if t.status == "planned_oom") == [
        "voxpopuli/attention-raw/split", "voxpopuli/helix-raw/split"]
    assert [t for t in naive if t.status == "ruled_oom"] == []
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
    # the paper's concat runs: a 100-epoch schedule stopped after epoch 24
    assert all(t.train.epochs == 100 and t.train.stop_after_epochs == 24 and t.train.stop_epoch == 24
               and t.train.lr == 0.001 for t in trials)
    _, trials = plan_trials(["grid=full", "datasets=[speechcommands-concat]", "train.epochs=30"])
    assert all(t.train.epochs == 30 and t.train.stop_epoch == 24 for t in trials)  # the command line wins
    # a schedule shorter than the dataset's stop epoch is refused, naming the dataset and both keys
    with pytest.raises(ConfigError, match=r"dataset_defs\.speechcommands-concat\.train\.stop_after_epochs=24: must "
                                          r"not exceed dataset_defs\.speechcommands-concat\.train\.epochs=3"):
        plan_trials(["grid=full", "datasets=[speechcommands-concat]", "train.epochs=3"])
    _, trials = plan_trials(["grid=full", "datasets=[speechcommands-concat]", "train.epochs=3",
                             "train.stop_after_epochs=2"])
    assert {(t.train.epochs, t.train.stop_epoch) for t in trials} == {(3, 2)}
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
    # refused before Ray or MLflow is imported (so before Ray starts), writing nothing
    [result] = run_main_each([[f"workdir={tmp_path}", "datasets=[synth-commands]", "variants=[helix-mel]",
                               "tracking_uri=http://127.0.0.1:9"]])
    assert result["rc"] == 3 and not result["heavy"], result
    assert "MLflow tracking at 'http://127.0.0.1:9' is unavailable: connection refused" in result["stderr"], result
    assert not list(tmp_path.iterdir())


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
    (["train.stop_after_epochs=0"], "train.stop_after_epochs=0: must be >= 1"),
    (["train.stop_after_epochs=7"], "train.stop_after_epochs=7: must not exceed train.epochs=6"),
    (["grid=full", "ruled_oom=[{dataset: esc50}]"], "must say why (reason: ...)"),
    (["dataset_defs.librispeech.options.subset=train-other-500"], "expected one of train-clean-100, train-clean-360"),
    (["dataset_defs.esc50.pool=first_clip"], "needs dataset_defs.esc50.options.concat_n"),
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


@pytest.mark.parametrize("override,needle", [
    ("dataset_defs.synth-commands.train={lr: -1}", "dataset_defs.synth-commands.train.lr=-1.0: must be > 0"),
    ("dataset_defs.synth-commands.model={num_heads: 3}", "dataset_defs.synth-commands.model.num_heads=3: must divide"),
    ("dataset_defs.synth-commands.resources={num_workers: 0}",
     "dataset_defs.synth-commands.resources.num_workers=0: must be >= 1"),
])
def test_a_datasets_own_sections_are_checked_like_the_sweeps(override, needle):
    """datasets.yaml entries merge their own train/model/resources over the sweep's: the merged values
    get the same checks, before Ray starts, naming the dataset's key."""
    with pytest.raises(ConfigError) as err:
        plan_trials([override, "datasets=[synth-commands]"])
    assert needle in str(err.value)


def test_pool_k_is_the_first_clip_on_each_frontend():
    """K = the tokens of the first joined clip, computed from the frontend (not typed in), unless overridden."""
    from helix_sweep.models.frontends import MelFrontend, RawFrontend, first_clip_tokens

    _, trials = plan_trials(["grid=full", "datasets=[speechcommands-concat]"])
    k = {t.frontend: t.pool_tokens for t in trials}
    one_second = 16000  # the first of 10 joined 1 s clips
    assert k == {"raw": RawFrontend(8).num_tokens(one_second), "mel": MelFrontend(8).num_tokens(one_second)}
    assert k == {"raw": 100, "mel": 16} == {f: first_clip_tokens(f, 1.0) for f in ("raw", "mel")}
    assert {t.tokens for t in trials if t.frontend == "mel"} == {152}  # K covers 16 of the example's 152
    # the other study datasets pool every token; an explicit pool_tokens overrides the first clip
    _, esc = plan_trials(["grid=full", "datasets=[esc50]", "folds=[1]"])
    assert {t.pool_tokens for t in esc} == {None}
    _, fixed = plan_trials(["grid=full", "datasets=[speechcommands-concat]",
                            "dataset_defs.speechcommands-concat.pool_tokens=50"])
    assert {t.pool_tokens for t in fixed} == {50}
    # synth-concat: first clip 0.5 s (raw 50, mel 8); grid=smoke keeps its measured K=50 on both (smoke.yaml)
    _, synth = plan_trials(["grid=smoke-large", "datasets=[synth-concat]", "dataset_defs.synth-concat.pool_tokens=null"])
    assert {t.frontend: t.pool_tokens for t in synth} == {"raw": 50, "mel": 8}
    _, smoke = plan_trials(["grid=smoke"])
    assert {t.pool_tokens for t in smoke} == {50}


def test_librispeech_subset_sets_the_speaker_count():
    _, default = plan_trials(["grid=full", "datasets=[librispeech]"])
    assert {(t.num_classes, t.task_options["subset"], t.train_clips) for t in default} == {
        (251, "train-clean-100", 9658)}
    _, big = plan_trials(["grid=full", "datasets=[librispeech]", "dataset_defs.librispeech.options.subset=train-clean-360"])
    assert {(t.num_classes, t.task_options["subset"], t.train_clips) for t in big} == {(921, "train-clean-360", 34906)}
