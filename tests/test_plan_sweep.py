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


def kept_out(*args: str) -> dict[str, list[str]]:
    """The trials of grid=full (narrowed by args) that are not run: {"planned_oom": [...], "ruled_oom": [...]}."""
    trials = plan_trials(["grid=full", *args])[1]
    return {s: [t.key for t in trials if t.status == s] for s in ("planned_oom", "ruled_oom")}


def test_planned_oom_comes_from_the_plan_and_ruled_oom_from_the_grid_rules():
    vox = ["datasets=[voxpopuli]"]
    # grid=full runs voxpopuli with SDPA (datasets.yaml), where the plan fits pure attention (slow): only
    # the grid's rule keeps it out, recorded as ruled_oom, not as a prediction of the plan
    assert kept_out(*vox) == {"planned_oom": [], "ruled_oom": ["voxpopuli/attention-raw/split"]}
    # naive attention at 48 GB: one 300 s clip through HELIX's attention layer needs ~57 GiB: the plan decides
    assert kept_out(*vox, "model.attention_impl=naive") == {
        "planned_oom": ["voxpopuli/helix-raw/split", "voxpopuli/attention-raw/split"], "ruled_oom": []}
    # naive at 80 GB: HELIX fits, pure attention does not (plan), so the rule has nothing left to add
    assert kept_out(*vox, "model.attention_impl=naive", "resources.gpu_memory_gb=80") == {
        "planned_oom": ["voxpopuli/attention-raw/split"], "ruled_oom": []}
    assert kept_out(*vox, "force_infeasible=true") == {"planned_oom": [], "ruled_oom": []}
    _, trials = plan_trials(["grid=full", *vox, "model.attention_impl=naive"])
    helix = {t.key: t for t in trials}["voxpopuli/helix-raw/split"]
    assert "30000 tokens needs 57.4 GiB" in helix.budget.oom_reason and helix.budget.planned_oom == "plan"
    assert helix.budget.oom_reason.startswith("plan: ")


def test_voxpopuli_feasibility_under_naive_and_sdpa_attention():
    """The plan's Table 1 rows at 30,000 tokens on 48 GB: with the paper's naive attention pure attention is
    OOM (the paper's cell) and so is HELIX (which the paper trained: its attention cannot have been naive);
    with SDPA HELIX fits and pure attention fits but is slow. Every trial carries both verdicts."""
    _, trials = plan_trials(["grid=full", "datasets=[voxpopuli]"])
    rows = {t.variant: t.budget.feasibility_by_impl for t in trials}
    assert rows == {"mamba-raw": {"naive": "ok", "sdpa": "ok"},
                    "helix-raw": {"naive": "oom", "sdpa": "ok"},
                    "attention-raw": {"naive": "oom", "sdpa": "slow"}}
    # the trials' own verdict is the one of their attention_impl (SDPA for voxpopuli)
    assert {t.variant: t.budget.feasibility for t in trials} == {v: r["sdpa"] for v, r in rows.items()}
    # the rest of the paper's Table 1 from the same plan: 500 tokens all ok, 3,000 tokens pure attention slow
    _, others = plan_trials(["grid=full", "datasets=[esc50,librispeech]", "folds=[1]", "frontends=[raw]"])
    naive = {(t.dataset, t.variant): t.budget.feasibility_by_impl["naive"] for t in others if t.frontend == "raw"}
    assert naive == {("esc50", "mamba-raw"): "ok", ("esc50", "helix-raw"): "ok", ("esc50", "attention-raw"): "ok",
                     ("librispeech", "mamba-raw"): "ok", ("librispeech", "helix-raw"): "ok",
                     ("librispeech", "attention-raw"): "slow"}
    assert {t.budget.feasibility_by_impl["sdpa"] for t in others if t.dataset == "librispeech"} == {"ok"}


def test_precision_auto_is_fp32_unless_memory_needs_half():
    from helix_sweep.training.loop import amp_dtype_for, resolve_precision

    _, trials = plan_trials(["grid=full", "datasets=[esc50,librispeech,voxpopuli]", "folds=[1]",
                             "model.attention_impl=naive", "force_infeasible=true"])
    precision = {t.key: t.budget.precision for t in trials}
    assert precision["esc50/attention-raw/fold1"] == "fp32"  # fits whole in fp32
    assert precision["librispeech/helix-raw/split"] == "fp32"
    assert precision["librispeech/attention-raw/split"] == "fp16"  # 56 GiB of naive attention: memory needs it
    assert precision["voxpopuli/helix-raw/split"] == "fp16"
    # the micro-batch is planned in the precision chosen: fp16 fits 16 of 32 clips of librispeech attention
    lib = {t.key: t for t in trials}["librispeech/attention-raw/split"]
    assert (lib.budget.micro_batch, lib.budget.grad_accum) == (16, 2)
    # one key forces mixed precision everywhere
    _, forced = plan_trials(["grid=full", "datasets=[esc50]", "folds=[1]", "train.precision=bf16"])
    assert {t.budget.precision for t in forced} == {"bf16"}
    # the loop trains in the plan's choice on a GPU, fp32 on CPU, and what was set explicitly
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_precision("auto", gpu, "fp32") == "fp32" and amp_dtype_for("auto", gpu, "fp32") is None
    assert resolve_precision("auto", gpu, "fp16") == "fp16" and amp_dtype_for("auto", gpu, "fp16") == torch.float16
    assert resolve_precision("auto", gpu) == "fp16"  # a spec nobody planned: the old default
    assert resolve_precision("auto", cpu, "fp16") == resolve_precision("bf16", cpu) == "fp32"
    assert amp_dtype_for("bf16", gpu, "fp32") == torch.bfloat16


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
