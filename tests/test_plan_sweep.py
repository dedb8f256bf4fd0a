"""The cost model inside the sweep: each trial's budget, computed once at grid expansion: planned oom
derived from the plan (plus the grids' explicit rules), micro-batches that fit the GPU; concurrency
from the cluster's GPUs, the dry-run table. Pure: no Ray cluster, no MLflow."""

from __future__ import annotations

from pathlib import Path

import torch

from helix_sweep.run import main, plan_trials
from helix_sweep.sweep.driver import autoscaler_gpus, max_concurrent, resolve_use_gpu
from helix_sweep.training.loop import micro_batch

ROOT = Path(__file__).resolve().parent.parent


def planned_oom(*args: str) -> list[str]:
    return [t.key for t in plan_trials(["grid=full", *args])[1] if t.status == "planned_oom"]


def test_planned_oom_comes_from_the_plan_and_the_grid_rules():
    # grid=full runs voxpopuli with SDPA (datasets.yaml): only the grid's rule keeps pure attention out
    assert planned_oom() == ["voxpopuli/attention-raw/split"]
    # naive attention at 48 GB: one 300 s clip through HELIX's attention layer needs ~57 GiB
    assert planned_oom("model.attention_impl=naive") == ["voxpopuli/helix-raw/split", "voxpopuli/attention-raw/split"]
    # SDPA fits both; the grid's explicit rule still keeps pure attention at 300 s out
    assert planned_oom("model.attention_impl=sdpa") == ["voxpopuli/attention-raw/split"]
    assert planned_oom("model.attention_impl=naive", "resources.gpu_memory_gb=80") == ["voxpopuli/attention-raw/split"]
    assert planned_oom("force_infeasible=true") == []
    _, trials = plan_trials(["grid=full", "model.attention_impl=sdpa", "datasets=[voxpopuli]"])
    by_key = {t.key: t for t in trials}
    assert by_key["voxpopuli/attention-raw/split"].budget.oom_reason == "a planned_oom rule of the grid"
    assert by_key["voxpopuli/attention-raw/split"].budget.planned_oom == "rule"
    _, trials = plan_trials(["grid=full", "datasets=[voxpopuli]", "model.attention_impl=naive"])
    helix = {t.key: t for t in trials}["voxpopuli/helix-raw/split"]
    assert "30000 tokens needs 57.4 GiB" in helix.budget.oom_reason and helix.budget.planned_oom == "plan"


def test_gpu_micro_batches_fit_and_keep_the_effective_batch():
    _, trials = plan_trials(["grid=full", "datasets=[librispeech,voxpopuli]", "force_infeasible=true",
                             "model.attention_impl=naive"])
    planned = {t.key: t for t in trials}
    micro = {k: t.budget.micro_batch for k, t in planned.items()}
    assert micro["librispeech/mamba-raw/split"] == 32  # fits whole
    assert micro["librispeech/attention-raw/split"] == 16  # 16 x 2 accumulation
    assert micro["voxpopuli/mamba-raw/split"] == 8  # 4 DDP workers x 8 clips
    assert micro["voxpopuli/attention-raw/split"] == 1  # forced although infeasible: smallest micro-batch
    for t in planned.values():
        m, accum = t.budget.micro_batch, t.budget.grad_accum
        assert m * accum * t.resources.num_workers == t.train.batch_size
    # the training loop takes the planned micro-batch on a GPU, the whole batch elsewhere
    lib = planned["librispeech/attention-raw/split"]
    assert micro_batch(lib, torch.device("cuda"), 32) == 16 and micro_batch(lib, torch.device("cpu"), 32) == 32
    # a micro-batch the user set is kept
    _, trials = plan_trials(["grid=full", "datasets=[librispeech]", "train.micro_batch=4"])
    assert {t.budget.micro_batch for t in trials} == {4}
    assert (trials[0].budget.micro_batch, trials[0].budget.grad_accum) == (4, 8)
    assert micro_batch(trials[0], torch.device("cpu"), 32) == micro_batch(trials[0], torch.device("cuda"), 32) == 4


def test_concurrency_follows_the_cluster_gpus():
    cfg, trials = plan_trials(["grid=full", "datasets=[librispeech,voxpopuli]"])
    runnable = [t for t in trials if t.status == "run"]
    gpu = resolve_use_gpu(runnable, 8)
    assert {t.resources.use_gpu for t in gpu} == {"true"}
    assert max_concurrent(cfg, gpu, gpus=8, cpus=64) == 8  # 1-GPU trials fill the GPUs the 4-GPU one leaves
    vox = [t for t in gpu if t.dataset == "voxpopuli"]
    assert max_concurrent(cfg, vox, gpus=8, cpus=64) == 2
    cpu = resolve_use_gpu(runnable, 0)  # no GPU now or ever: CPU trials, one per CPU share
    assert {t.resources.use_gpu for t in cpu} == {"false"}
    assert max_concurrent(cfg, cpu, gpus=0, cpus=6) == 6
    cfg.max_concurrent_trials = 3
    assert max_concurrent(cfg, gpu, gpus=8, cpus=64) == 3


def test_autoscaler_gpu_budget_from_the_cluster_yaml(tmp_path):
    assert autoscaler_gpus(ROOT / "cluster.yaml") == 8
    assert autoscaler_gpus(ROOT / "cluster" / "fake_cluster.yaml") == 2
    assert autoscaler_gpus(tmp_path / "absent.yaml") == 0
    capped = tmp_path / "capped.yaml"
    capped.write_text("max_workers: 3\nhead_node_type: h\navailable_node_types:\n"
                      "  h: {resources: {CPU: 8}, max_workers: 0}\n"
                      "  a: {resources: {GPU: 4}, max_workers: 2}\n"
                      "  b: {resources: {GPU: 1}, max_workers: 5}\n")
    assert autoscaler_gpus(capped) == 4 * 2 + 1 * 1  # 3 nodes at most, the GPU-richest first


def test_dry_run_table_shows_plan_and_micro_batches(capsys):
    assert main(["grid=full", "datasets=[librispeech,voxpopuli]", "dry_run=true", "model.attention_impl=naive"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if "/split" in line}
    assert "slow@48GB" in rows["librispeech/attention-raw/split"] and "16 x 2" in rows["librispeech/attention-raw/split"]
    assert "ok@48GB" in rows["voxpopuli/mamba-raw/split"] and "8 x 1" in rows["voxpopuli/mamba-raw/split"]
    assert rows["voxpopuli/helix-raw/split"].split()[-3:] == ["oom@48GB", "-", "planned_oom"]


def test_smoke_trials_are_all_feasible():
    _, trials = plan_trials(["grid=smoke"])
    assert {t.budget.feasibility for t in trials} == {"ok"} and {t.status for t in trials} == {"run"}
