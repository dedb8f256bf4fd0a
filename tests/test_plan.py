"""The cost model's pure parts (helix_sweep.training.budget): parameter matching, tokens, memory
model, Table 1 feasibility, micro-batching, GPU-hour sanity against the study; makespan scheduling
(helix_sweep.sweep.schedule) and the plan command (helix_sweep.plan)."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import pytest

from helix_sweep import plan
from helix_sweep.config import load_config
from helix_sweep.models import build_classifier, classifier_params, mamba_params, matched_d_ffn
from helix_sweep.models.frontends import num_tokens
from helix_sweep.sweep.grid import expand_grid
from helix_sweep.sweep.schedule import lower_bound, makespans, order_longest_first, simulate_makespan
from helix_sweep.training import budget
from helix_sweep.training.budget import (
    GIB, InfeasibleTrial, PlanTrial, activation_memory_bytes, as_trial, choose_micro_batch,
    estimate_gpu_hours, feasibility, plan_trial,
)


@lru_cache(maxsize=None)
def _study() -> tuple[PlanTrial, ...]:
    return tuple(as_trial(t) for t in expand_grid(load_config(["grid=full", "model.attention_impl=naive"])))


def study_trials() -> list[PlanTrial]:
    """The study's grid (search_spaces/grids/full.yaml) with naive attention everywhere, as the study ran."""
    return list(_study())


def trial(pattern="MMMMMM", tokens=500, attention_impl="naive", **kw) -> PlanTrial:
    kw.setdefault("epochs", 100)
    kw.setdefault("train_clips", 1600)
    return PlanTrial("t", pattern, "raw", tokens, attention_impl=attention_impl, **kw)


def test_param_matching_follows_the_spec():
    report = build_classifier("MMMAMM", "raw", 50).param_report()
    mamba_layer, attention_layer = report["layers"][0], report["layers"][3]
    assert mamba_params(256) == 462_336  # mamba_ssm Mamba at d=256, N=32, d_conv=4, expand=2
    assert mamba_layer == 1_056_512
    assert report["d_ffn"] == matched_d_ffn(256) == (1_056_512 - (4 * 256**2 + 4 * 256) - 4 * 256) // (2 * 256 + 1) == 1544
    assert 0 <= attention_layer - mamba_layer <= 256
    assert report["total"] == report["frontend"] + sum(report["layers"]) + report["head"]


def test_param_count_agrees_with_the_model_package():
    # the cost model's weights/grads/AdamW figure counts the real classifier (on the meta device)
    report = build_classifier("MMMAMM", "mel", 35).param_report()
    assert classifier_params("MMMAMM", "mel", 35) == report["total"]
    t = PlanTrial("t", "MMMAMM", "mel", 72, 1, 1, num_classes=35, precision="fp32")
    assert budget.static_memory_bytes(t) == 16 * report["total"]


def test_token_counts():
    assert [num_tokens("raw", int(s * 16000)) for s in (1, 5, 10, 30, 300)] == [100, 500, 1000, 3000, 30000]
    # F = 1 + floor(T / 512) frames; 8 frequency patches x floor(F / 16) time patches
    assert num_tokens("mel", 80_000) == 8 * (157 // 16) == 72
    assert num_tokens("mel", 16_000) == 16
    assert num_tokens("mel", 300 * 16_000) == 8 * (9376 // 16) == 4688
    assert budget.tokens_per_clip("mel", 5.0) == 72 and budget.tokens_per_clip("raw", 0.5) == 50


def test_memory_grows_linearly_for_mamba_and_quadratically_for_naive_attention():
    m1, m2 = (activation_memory_bytes("MMMMMM", L, 8) for L in (1000, 2000))
    assert m2 / m1 == pytest.approx(2.0, rel=1e-6)
    a1, a2 = (activation_memory_bytes("AAAAAA", L, 8, "naive") for L in (10_000, 20_000))
    assert 3.5 < a2 / a1 < 4.0  # dominated by the B x H x L^2 weights
    s1, s2 = (activation_memory_bytes("AAAAAA", L, 8, "sdpa") for L in (10_000, 20_000))
    assert s2 / s1 == pytest.approx(2.0, rel=1e-6)
    # at 3,000 tokens the naive weights alone are 4 heads x 3000^2 x 6 bytes per clip per layer
    per_clip = activation_memory_bytes("AAAAAA", 3000, 1, "naive")
    assert per_clip > 6 * 4 * 3000**2 * 6


def test_table1_pattern_at_48gb_naive_attention():
    cells = {(L, pat): feasibility(trial(pat, L), 48) for L in (500, 3000, 30_000)
             for pat in ("MMMMMM", "MMMAMM", "AAAAAA")}
    assert [cells[500, p] for p in ("MMMMMM", "MMMAMM", "AAAAAA")] == ["ok", "ok", "ok"]
    assert cells[3000, "MMMMMM"] == cells[3000, "MMMAMM"] == "ok"
    assert cells[3000, "AAAAAA"] == "slow"
    assert cells[30_000, "MMMMMM"] == "ok"
    assert cells[30_000, "AAAAAA"] == "oom"


def test_sdpa_removes_the_oom_but_not_the_quadratic_time():
    assert feasibility(trial("AAAAAA", 30_000, "sdpa"), 48) == "slow"
    assert feasibility(trial("MMMAMM", 30_000, "sdpa"), 48) == "ok"
    assert feasibility(trial("AAAAAA", 3000, "sdpa"), 48) == "ok"


def test_micro_batch_keeps_the_effective_batch():
    t = trial("MMMMMM", 30_000)
    micro, accum = choose_micro_batch(t, 48)
    assert micro < 32 and micro * accum == 32
    assert budget.training_memory_bytes(t, micro) <= 0.8 * 48 * GIB
    assert budget.training_memory_bytes(t, 2 * micro) > 0.8 * 48 * GIB  # the largest that fits
    micro4, accum4 = choose_micro_batch(t, 48, workers=4)  # DDP: 8 clips per worker
    assert micro4 * accum4 * 4 == 32
    assert choose_micro_batch(trial("MMMMMM", 500), 48) == (32, 1)
    small = choose_micro_batch(t, 24)
    assert small[0] < micro and small[0] * small[1] == 32
    with pytest.raises(InfeasibleTrial, match="30000 tokens"):
        choose_micro_batch(trial("AAAAAA", 30_000), 48)
    with pytest.raises(ValueError, match="workers=3"):
        choose_micro_batch(t, 48, workers=3)


def test_gpu_hours_against_the_study():
    by_key = {t.key: t for t in study_trials()}
    esc50 = sum(estimate_gpu_hours(by_key[f"esc50/mamba-raw/fold{k}"]) for k in range(1, 6))
    assert esc50 < 5  # "ESC-50 ... under 5 GPU-hours per variant"
    sc = estimate_gpu_hours(by_key["speechcommands/helix-raw/split"])
    assert 6 < sc < 18  # "Speech Commands about 12"
    vox = estimate_gpu_hours(by_key["voxpopuli/mamba-raw/split"])
    assert vox > max(estimate_gpu_hours(t) for t in by_key.values() if "voxpopuli" not in t.key)


def test_bad_trials_name_the_field():
    with pytest.raises(ValueError, match="pattern='MMX'"):
        as_trial(replace(trial(), pattern="MMX"))
    with pytest.raises(ValueError, match="missing fields \\['epochs', 'train_clips'\\]"):
        as_trial({"key": "k", "pattern": "M", "frontend": "raw", "tokens": 5})
    assert as_trial(dict(key="k", pattern="MA", frontend="mel", tokens=5, epochs=1,
                              train_clips=3)).pattern == "MA"


def test_list_scheduling():
    assert simulate_makespan([3, 3, 2, 2, 2], 2, "fifo") == 7  # 3|3, then 2,2 | 2
    assert simulate_makespan([1, 1, 1, 1, 4], 2, "fifo") == 6
    assert simulate_makespan([1, 1, 1, 1, 4], 2, "longest_first") == 4
    assert lower_bound([1, 1, 1, 1, 4], 2) == 4
    assert lower_bound([1] * 10, 4) == 2.5
    # multi-GPU jobs: (hours, gpus); longest-first by GPU-time starts the wide job first
    jobs = [(1.0, 1), (1.0, 4), (1.0, 1)]
    assert simulate_makespan(jobs, 4, "fifo") == 2.0  # the third job skips ahead of the wide one
    jobs = [(1.0, 1)] * 8 + [(4.0, 2)]
    assert simulate_makespan(jobs, 4, "fifo") == 6.0  # singles 0-2, then the wide one 2-6
    assert simulate_makespan(jobs, 4, "longest_first") == 4.0  # wide 0-4 beside the singles
    assert lower_bound(jobs, 4) == 4.0
    with pytest.raises(ValueError, match="n_gpus=2"):
        simulate_makespan([(1.0, 4)], 2)


def test_longest_first_near_the_bound_on_the_study_grid():
    plans = [plan_trial(t) for t in study_trials()]
    m = makespans(plans, 8)
    assert m["longest_first"] <= 1.05 * m["lower_bound"]
    assert m["fifo"] > m["longest_first"]
    ordered = order_longest_first(study_trials())
    assert ordered[0].key.startswith("voxpopuli/")
    assert ordered[-1].key == "voxpopuli/attention-raw/split"  # oom: costs nothing, goes last


def test_main_prints_table_and_makespans():
    lines = []
    plans = plan.main(study_trials()[:12] + [trial("AAAAAA", 30_000)], gpus=4, out=lines.append)
    text = "\n".join(lines)
    assert "esc50/mamba-raw/fold1" in text and "oom" in text and "longest-first" in text
    assert sum(p.feasibility == "oom" for p in plans) == 1


def test_grid_trials_adapt():
    specs = expand_grid(load_config(["grid=full"]))
    trials = [as_trial(s) for s in specs]
    vox = {t.key: t for t in trials}["voxpopuli/mamba-raw/split"]
    assert (vox.tokens, vox.workers, vox.attention_impl) == (30_000, 4, "sdpa")  # datasets.yaml: SDPA at 300 s
    # the SPEC's grid: six variants on ESC-50 (5 folds), UrbanSound8K (10), both Speech Commands
    # tasks; the three raw variants on the two speaker-ID sets
    assert len(trials) == 6 * (5 + 10 + 1 + 1) + 3 * 2 == 108
