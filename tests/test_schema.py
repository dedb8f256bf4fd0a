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
