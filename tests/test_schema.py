"""The MLflow schema's pure helpers: filter strings, run states, param values, fold order and mean/std."""

from __future__ import annotations

import statistics

import pytest

from helix_sweep.sweep import schema as S


def test_tag_filter_quotes_values():
    assert S.tag_filter({S.KIND: S.KIND_TRIAL}) == "tags.kind = 'trial'"
    assert S.tag_filter({S.KIND: S.KIND_PARENT, S.DATASET: "esc50", S.VARIANT: "helix-raw"}) == (
        "tags.kind = 'parent' and tags.dataset = 'esc50' and tags.variant = 'helix-raw'")
    assert S.tag_filter({S.TRIAL_KEY: "it's\\x"}) == "tags.trial_key = 'it\\'s\\\\x'"


def test_trial_tags_and_run_names():
    assert S.trial_tags("esc50/helix-raw/fold2", "esc50", "helix-raw", 2) == {
        "kind": "trial", "trial_key": "esc50/helix-raw/fold2", "dataset": "esc50", "variant": "helix-raw", "fold": "2"}
    assert S.parent_run_name("esc50", "helix-raw") == "esc50/helix-raw"


def test_run_state_per_status():
    assert S.run_state(S.FINISHED) == "FINISHED"
    assert S.run_state(S.STOPPED) == S.run_state(S.PLANNED_OOM) == "KILLED"
    assert {S.run_state(s) for s in (S.OOM, S.DIVERGED, S.FAILED, S.RUNNING)} == {"FAILED"}


def test_param_value():
    assert S.param_value("a") == "a" and S.param_value(3) == "3" and S.param_value(None) == "None"
    assert S.param_value([3, 5]) == "[3, 5]" and S.param_value({"a": 1}) == '{"a": 1}'
    assert len(S.param_value("x" * 7000)) == 6000  # MLflow's limit


def test_fold_order_and_mean_std():
    assert sorted(["10", "split", "2", "1"], key=S.fold_sort_key) == ["1", "2", "10", "split"]
    values = [0.55, 0.625, 0.4875]
    mean, std = S.mean_std(values)
    assert mean == pytest.approx(statistics.mean(values), abs=1e-15)
    assert std == pytest.approx(statistics.stdev(values), abs=1e-15)  # sample std, ddof=1
    assert S.mean_std([0.8]) == (0.8, None) and S.mean_std([]) == (None, None)


def test_trial_params_hold_every_setting_that_changes_a_result():
    """Model (pos_encoding too), train with augment, task options, pooling, the plan's verdicts; the worker
    adds what it resolved: the precision it trained in and the scan it ran (the requested ones kept)."""
    from helix_sweep.run import plan_trials

    _, trials = plan_trials(["grid=full", "datasets=[speechcommands-concat,voxpopuli]", "variants=[helix-mel,attention-raw]"])
    spec = {t.key: t for t in trials}["speechcommands-concat/helix-mel/split"]
    params = S.trial_params(spec)
    expected = {"pos_encoding": "none", "attention_impl": "naive", "d_model": 256, "d_state": 32, "d_conv": 4,
                "expand": 2, "num_heads": 4, "scan_impl": "auto", "epochs": 100, "stop_after_epochs": 24,
                "lr": 3e-4, "min_lr": 1e-6, "weight_decay": 0.05, "grad_clip": 1.0, "batch_size": 32, "seed": 0,
                "augment.mixup": True, "augment.mixup_alpha": 0.3, "augment.time_shift_s": 0.5, "task.concat_n": 10,
                "pool_tokens": 16, "tokens_per_clip": 152, "precision": "fp32", "precision_requested": "auto",
                "plan.feasibility": "ok", "plan.feasibility.naive": "ok", "plan.feasibility.sdpa": "ok",
                "num_classes": 35, "frontend": "mel", "pattern": "MMMAMM", "dataset": "speechcommands-concat"}
    assert {k: params.get(k) for k in expected} == expected
    assert "inject" not in params and not any(k.startswith("inject") for k in params)
    assert all(len(S.param_value(v)) < 6000 for v in params.values())
    ruled = S.trial_params({t.key: t for t in trials}["voxpopuli/attention-raw/split"])
    assert (ruled["plan.feasibility"], ruled["plan.feasibility.naive"], ruled["plan.feasibility.sdpa"]) == (
        "slow", "oom", "slow")
    assert S.run_state(S.RULED_OOM) == "KILLED" and S.RULED_OOM in S.TERMINAL_STATUSES


def test_worker_params_log_what_the_worker_resolved():
    """The worker's params (imports Ray, starts nothing): the precision it trained in and the scan it ran win
    over the plan's, the requested ones are kept beside them."""
    from helix_sweep.run import plan_trials
    from helix_sweep.sweep.worker import run_params
    from helix_sweep.training import TrialReport

    _, [spec] = plan_trials(["grid=full", "datasets=[speechcommands-concat]", "variants=[helix-mel]"])
    report = TrialReport(n_params=100, n_params_per_layer=[10] * 6, d_ffn=1544, tokens_per_clip=152, micro_batch=32,
                         grad_accum=1, steps_per_epoch=2651, device="cpu", precision="fp32", scan_impl="pure",
                         label_names=[str(i) for i in range(35)], task={"n_train": 84843, "n_test": 11005})
    logged = run_params(spec, report, world_size=1)
    assert (logged["precision"], logged["precision_requested"], logged["scan_impl"], logged["scan_impl_requested"]) == (
        "fp32", "auto", "pure", "auto")
    assert logged["pos_encoding"] == "none" and logged["n_train"] == 84843 and logged["num_classes"] == 35
