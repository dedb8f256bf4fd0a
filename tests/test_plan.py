"""The planner's pure parts: parameter matching, tokens, memory model, Table 1 feasibility,
micro-batching, GPU-hour sanity against the study, and makespan scheduling."""

from __future__ import annotations

from dataclasses import replace

import pytest

from helix_sweep import plan
from helix_sweep.plan import (
    GIB, InfeasibleTrial, PlanTrial, activation_memory_bytes, choose_micro_batch, count_params,
    estimate_gpu_hours, feasibility, lower_bound, mel_tokens, order_longest_first, raw_tokens,
    simulate_makespan, study_trials,
)


def trial(pattern="MMMMMM", tokens=500, attention_impl="naive", **kw) -> PlanTrial:
    kw.setdefault("epochs", 100)
    kw.setdefault("train_clips", 1600)
    return PlanTrial("t", pattern, "raw", tokens, attention_impl=attention_impl, **kw)


def test_param_matching_follows_the_spec():
    p = count_params("MMMAMM", "raw", num_classes=50)
    assert p.mamba_mixer == 462_336  # mamba_ssm Mamba at d=256, N=32, d_conv=4, expand=2
    assert p.mamba_layer == 1_056_512
    assert p.d_ffn == (1_056_512 - (4 * 256**2 + 4 * 256) - 4 * 256) // (2 * 256 + 1) == 1544
    assert 0 <= p.attention_layer - p.mamba_layer <= 256
    assert p.total == p.frontend + sum(p.layers) + p.head


def test_param_count_agrees_with_the_model_package():
    models = pytest.importorskip("helix_sweep.models")
    m = models.build_classifier("MMMAMM", "mel", 35)
    report = m.param_report()
    p = count_params("MMMAMM", "mel", num_classes=35)
    assert report["d_ffn"] == p.d_ffn
    assert report["layers"] == list(p.layers)
    assert report["total"] == p.total


def test_token_counts():
    assert [raw_tokens(int(s * 16000)) for s in (1, 5, 10, 30, 300)] == [100, 500, 1000, 3000, 30000]
    # F = 1 + floor(T / 512) frames; 8 frequency patches x floor(F / 16) time patches
    assert mel_tokens(80_000) == 8 * (157 // 16) == 72
    assert mel_tokens(16_000) == 16
    assert mel_tokens(300 * 16_000) == 8 * (9376 // 16) == 4688


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
    assert plan.training_memory_bytes(t, micro) <= 0.8 * 48 * GIB
    assert plan.training_memory_bytes(t, 2 * micro) > 0.8 * 48 * GIB  # the largest that fits
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
        plan.as_trial(replace(trial(), pattern="MMX"))
    with pytest.raises(ValueError, match="missing fields \\['epochs', 'train_clips'\\]"):
        plan.as_trial({"key": "k", "pattern": "M", "frontend": "raw", "tokens": 5})
    assert plan.as_trial(dict(key="k", pattern="MA", frontend="mel", tokens=5, epochs=1,
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
    plans = [plan.plan_trial(t) for t in study_trials()]
    m = plan.makespans(plans, 8)
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
    config = pytest.importorskip("helix_sweep.config")
    grid = pytest.importorskip("helix_sweep.sweep.grid")
    specs = grid.expand_grid(config.load_config(["grid=full"]))
    trials = [plan.as_trial(s) for s in specs]
    vox = {t.key: t for t in trials}["voxpopuli/mamba-raw/split"]
    assert (vox.tokens, vox.workers, vox.attention_impl) == (30_000, 4, "sdpa")  # datasets.yaml: SDPA at 300 s
    assert len(trials) == len(study_trials())
