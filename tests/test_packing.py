"""Packing trials onto GPU shares and the planner's measured figures (helix_sweep.training.packing):
the share rule, a hand-made calibration file read by the grid and the plan (source measured /
modelled), fractional GPUs in the makespan simulation, the plan's makespan with and without packing
on grid=full. Pure: no Ray, no GPU."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache

import pytest

from helix_sweep import plan
from helix_sweep.config import ConfigError, load_config
from helix_sweep.run import main as run_main
from helix_sweep.run import plan_trials
from helix_sweep.sweep.driver import max_concurrent, resolve_use_gpu
from helix_sweep.sweep.trainable import worker_resources
from helix_sweep.sweep.grid import expand_grid
from helix_sweep.sweep.schedule import lower_bound, makespans, simulate_makespan
from helix_sweep.training import budget, packing
from helix_sweep.training.packing import (
    CalibrationError, format_fraction, gpu_fraction, load_calibration, max_trials_per_gpu, share_for,
)

GIB = budget.GIB


@lru_cache(maxsize=None)
def full_grid():
    return tuple(expand_grid(load_config(["grid=full", "plan.calibration=none"])))  # modelled figures only


def by_key(trials) -> dict:
    return {t.key: t for t in trials}


def test_share_rule():
    # memory: peak x 1.5 headroom within the share; utilisation: busy time within the share
    assert share_for(2 * GIB, 0.05, 48) == 0.125
    assert share_for(5 * GIB, 0.05, 48) == 0.25  # 7.5 GB > 6 GB (1/8 of 48)
    assert share_for(2 * GIB, 0.3, 48) == 0.5
    assert share_for(2 * GIB, 0.6, 48) == 1.0
    assert share_for(30 * GIB, 0.1, 48) == 1.0  # 45 GB: a whole GPU
    assert share_for(2 * GIB, 0.05, 48, max_trials=4) == 0.25  # no more trials than the node's CPUs serve
    assert share_for(2 * GIB, 0.05, 48, max_trials=1) == 1.0
    assert max_trials_per_gpu(4, 1) == 4 and max_trials_per_gpu(4, 0.5) == 8 and max_trials_per_gpu(64, 1) == 8
    assert max_trials_per_gpu(1, 2) == 1
    assert [format_fraction(f) for f in (1, 0.5, 0.25, 0.125, 0.3, 2)] == ["1", "1/2", "1/4", "1/8", "0.3", "2"]


def test_short_trials_share_a_gpu_long_and_ddp_trials_keep_whole_ones():
    trials = by_key(full_grid())
    share = {k: t.budget.gpu_fraction for k, t in trials.items()}
    # resources.gpus_per_worker: auto (base.yaml), at most cpus_per_gpu / cpus_per_worker = 4 per GPU
    assert share["esc50/helix-mel/fold1"] == share["speechcommands/attention-mel/split"] == 0.25
    assert share["esc50/mamba-raw/fold1"] == 0.5  # the cost model's utilisation ~0.3
    assert share["librispeech/helix-raw/split"] == 1.0  # 3,000 tokens keep the GPU busy
    assert share["voxpopuli/mamba-raw/split"] == 1.0  # DDP over 4 GPUs
    assert set(share.values()) <= {0.125, 0.25, 0.5, 1.0}
    # eight per GPU when the node's CPUs allow it
    _, more = plan_trials(["grid=full", "datasets=[esc50]", "folds=[1]", "resources.cpus_per_gpu=8",
                           "plan.calibration=none"])
    assert by_key(more)["esc50/helix-mel/fold1"].budget.gpu_fraction == 0.125
    # a number is taken as given; a whole number of GPUs too
    _, fixed = plan_trials(["grid=full", "datasets=[esc50]", "folds=[1]", "resources.gpus_per_worker=0.5"])
    assert {t.budget.gpu_fraction for t in fixed} == {0.5}
    _, two = plan_trials(["grid=full", "datasets=[esc50]", "folds=[1]", "resources.gpus_per_worker=2"])
    assert {t.budget.gpu_fraction for t in two} == {2.0}
    # a trial the plan finds infeasible keeps a whole GPU when forced to run
    _, forced = plan_trials(["grid=full", "datasets=[voxpopuli]", "model.attention_impl=naive",
                             "force_infeasible=true", "resources.num_workers=1"])
    assert by_key(forced)["voxpopuli/attention-raw/split"].budget.gpu_fraction == 1.0


def test_ray_gets_the_share_and_more_trials_run_than_gpus():
    cfg, trials = plan_trials(["grid=full", "datasets=[esc50]", "folds=[1]", "plan.calibration=none"])
    gpu = resolve_use_gpu(trials, 1)
    mel = by_key(gpu)["esc50/helix-mel/fold1"]
    assert worker_resources(mel, True) == {"CPU": 1.0, "GPU": 0.25}
    assert worker_resources(mel, False) == {"CPU": 1.0}
    assert max_concurrent(cfg, gpu, gpus=1, cpus=64) == 4  # four 1/4-GPU trials on the one GPU
    assert max_concurrent(cfg, gpu, gpus=8, cpus=64) == 32


def test_trial_table_shows_the_share(capsys):
    assert run_main(["grid=full", "datasets=[esc50,librispeech]", "folds=[1]", "dry_run=true",
                     "plan.calibration=none"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("esc50/", "librispeech/"))}
    assert "1x1/4gpu" in rows["esc50/helix-mel/fold1"] and "1x1/2gpu" in rows["esc50/helix-raw/fold1"]
    assert "1x1gpu" in rows["librispeech/helix-raw/split"]


def test_bad_gpus_per_worker_and_calibration_are_refused(tmp_path):
    for bad in ("1.5", "0", "-1", "half"):
        with pytest.raises(ConfigError, match="resources.gpus_per_worker"):
            load_config([f"resources.gpus_per_worker={bad}"])
    with pytest.raises(ConfigError, match="no such file"):
        expand_grid(load_config(["grid=full", f"plan.calibration={tmp_path / 'absent.json'}"]))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": 1, "gpu": "X", "memory_gb": 48,
                                  "steps": [{"pattern": "MMMAMM", "frontend": "mel", "tokens": 72, "batch": 32}]}))
    with pytest.raises(CalibrationError, match=r"broken.json: steps\[0\]: bad or missing field .*step_s"):
        load_calibration(str(broken))
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: not a readable JSON"):
        expand_grid(load_config(["grid=full", f"plan.calibration={broken}"]))
    assert load_calibration("none") is None
    assert load_calibration("auto", "No Such GPU 9000") is None  # no file for that GPU: modelled


def write_calibration(path, **over) -> str:
    """A hand-made calibration file for the GPU the plan assumes (48 GB): ESC-50 helix-mel measured
    slow, busy and large; attention-mel measured with its packed throughput."""
    data = {
        "format": 1, "gpu": "NVIDIA L40S", "memory_gb": 48, "auto_scan_impl": "triton",
        "steps": [
            {"pattern": "MMMAMM", "frontend": "mel", "tokens": 72, "attention_impl": "naive", "precision": "fp32",
             "scan_impl": "triton", "batch": 32, "step_s": 0.9, "peak_gib": 20.0, "static_gib": 0.1,
             "utilisation": 0.6},
            # measured at half the batch: time and activations scale to the trial's 32 clips
            {"pattern": "AAAAAA", "frontend": "mel", "tokens": 72, "attention_impl": "naive", "precision": "fp32",
             "scan_impl": "none", "batch": 16, "step_s": 0.02, "peak_gib": 0.3, "static_gib": 0.1,
             "utilisation": 0.05},
            # another scan implementation's figure: not the one model.scan_impl=auto runs there
            {"pattern": "MMMMMM", "frontend": "mel", "tokens": 72, "attention_impl": "naive", "precision": "fp32",
             "scan_impl": "pure", "batch": 32, "step_s": 5.0, "peak_gib": 1.0, "static_gib": 0.1},
        ],
        "packing": [{"pattern": "AAAAAA", "frontend": "mel", "tokens": 72, "k": 4, "ratio": 2.0}],
        **over,
    }
    path.write_text(json.dumps(data))
    return str(path)


def test_the_plan_uses_measured_figures_and_says_which(tmp_path):
    cal = load_calibration(write_calibration(tmp_path / "nvidia-l40s.json"))
    trials = [budget.as_trial(t) for t in full_grid()]
    plans, rows = plan.plan_rows(trials, calibration=cal, max_trials_per_gpu=4)
    p, k = {x.key: x for x in plans}, {x.key: x for x in rows}
    measured = sorted(key for key, r in k.items() if r.source == "measured")
    assert measured == [f"esc50/{v}/fold{i}" for v in ("attention-mel", "helix-mel") for i in range(1, 6)]
    t = budget.as_trial(by_key(full_grid())["esc50/helix-mel/fold1"])
    steps = -(-t.train_clips // t.batch_size)
    expected = t.epochs * (steps * 0.9 + 0.9 / 32 / 3 * t.eval_clips) / 3600
    assert p["esc50/helix-mel/fold1"].gpu_hours == pytest.approx(expected)
    assert k["esc50/helix-mel/fold1"].fraction == 1.0  # measured: 20 GiB and 60% busy keep a whole GPU
    att = k["esc50/attention-mel/fold1"]
    assert att.peak_gib == pytest.approx(0.1 + 0.2 * 2 + 1.5)  # activations x 32/16, plus the CUDA reserve
    assert att.fraction == 0.25 and att.packed_hours == pytest.approx(2.0 * att.gpu_hours)  # 4 / ratio 2.0
    # modelled trials are the cost model's figures
    mamba = by_key(full_grid())["esc50/mamba-mel/fold1"]
    assert k["esc50/mamba-mel/fold1"].source == "modelled"
    assert p["esc50/mamba-mel/fold1"].gpu_hours == pytest.approx(budget.estimate_gpu_hours(budget.as_trial(mamba)))

    lines: list[str] = []
    plan.main(trials, calibration=cal, max_trials_per_gpu=4, out=lines.append)
    text = "\n".join(lines)
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("esc50/helix-mel/fold1 "))
    assert row.split()[-3:] == ["measured", "1", f"{expected:.2f}"]
    assert next(line for line in lines if line.startswith("esc50/mamba-mel/fold1 ")).split()[-3] == "modelled"
    assert "source of GPU-hours and makespans: measured for 10 of 108 runnable trials, modelled for the rest" in text
    assert "measured on NVIDIA L40S" in text and "makespan on 8 GPUs, packed" in text


def test_the_grid_reads_the_calibration_named_in_the_config(tmp_path, capsys):
    path = write_calibration(tmp_path / "cal.json")
    _, trials = plan_trials(["grid=full", "datasets=[esc50]", "folds=[1]", f"plan.calibration={path}"])
    share = {t.key: t.budget.gpu_fraction for t in trials}
    assert share["esc50/helix-mel/fold1"] == 1.0 and share["esc50/attention-mel/fold1"] == 0.25
    _, modelled = plan_trials(["grid=full", "datasets=[esc50]", "folds=[1]", "plan.calibration=none"])
    assert by_key(modelled)["esc50/helix-mel/fold1"].budget.gpu_fraction == 0.25
    # the plan command: calibration= on its command line
    assert plan._cli(["grid=full", f"calibration={path}"]) == 0
    out = capsys.readouterr().out
    assert "measured for 10 of 107 runnable trials" in out and f"calibration: {path}" in out
    assert plan._cli(["grid=full", "calibration=none"]) == 0
    assert "source of GPU-hours and makespans: modelled" in capsys.readouterr().out


def test_fractional_gpus_in_the_schedule():
    quarter = [(1.0, 1, 0.25)] * 8
    assert simulate_makespan(quarter, 2) == 1.0  # four per GPU, all at once
    assert simulate_makespan(quarter + [(1.0, 1, 0.25)], 2) == 2.0
    assert lower_bound(quarter, 2) == 1.0
    # a whole-GPU job waits for a GPU with nothing on it
    assert simulate_makespan([(1.0, 1, 0.5), (1.0, 1, 1.0), (1.0, 1, 0.5)], 1, "fifo") == 2.0
    # shares go on the fullest GPU they fit, so a later whole-GPU job finds an empty one
    assert simulate_makespan([(1.0, 1, 0.5), (1.0, 1, 0.5), (1.0, 1, 1.0)], 2, "fifo") == 1.0
    # longest-first starts a long packed job as early as a whole-GPU job of its length
    jobs = [(1.0, 1, 1.0)] * 4 + [(4.0, 1, 0.25)]
    assert simulate_makespan(jobs, 2, "fifo") == 6.0
    assert simulate_makespan(jobs, 2, "longest_first") == 4.0
    with pytest.raises(ValueError, match="share"):
        simulate_makespan([(1.0, 1, 1.5)], 2)


def test_packing_shortens_the_full_grid():
    """grid=full on 8 GPUs of 48 GB, modelled: the packed makespan is below the whole-GPU one."""
    trials = [budget.as_trial(t) for t in full_grid()]
    plans, rows = plan.plan_rows(trials, max_trials_per_gpu=4)
    whole, packed = makespans(plans, 8), makespans(rows, 8, packed=True)
    assert packed["longest_first"] < 0.8 * whole["longest_first"]
    assert packed["lower_bound"] < whole["lower_bound"]
    assert packed["longest_first"] <= 1.1 * packed["lower_bound"]
    # a packed trial takes longer than alone, never less
    for r in rows:
        if r.gpu_hours:
            assert r.packed_hours >= r.gpu_hours / r.workers - 1e-9
    # with no packing allowed (one trial per GPU), nothing changes
    _, alone = plan.plan_rows(trials, max_trials_per_gpu=1)
    assert makespans(alone, 8, packed=True) == pytest.approx(whole)


def test_modelled_slowdown_and_utilisation():
    t = budget.as_trial(by_key(full_grid())["speechcommands/helix-mel/split"])
    cost = packing.step_cost(t, 32)
    assert cost.source == "modelled" and cost.utilisation < 0.05  # launch-bound: the GPU mostly waits
    assert packing.packed_slowdown(t, 0.25, cost) == pytest.approx(1 + packing.PACKING_OVERHEAD)
    busy = replace(cost, utilisation=0.5)
    assert packing.packed_slowdown(t, 0.25, busy) == pytest.approx(2.0 * (1 + packing.PACKING_OVERHEAD))
    assert packing.packed_slowdown(t, 1.0, busy) == 1.0
    long = budget.as_trial(by_key(full_grid())["librispeech/helix-raw/split"])
    assert packing.step_cost(long, 32).utilisation > 0.5
    assert gpu_fraction(long) == 1.0
