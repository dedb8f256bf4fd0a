"""Multi-worker (DDP) trials: every decision a rank could take alone (skip a step on a non-finite
loss, stop as diverged, stop on out of memory, write a mid-epoch checkpoint) is taken by all ranks
together, so the ranks never wait on each other in mismatched collectives.

The trials run the real training loop (run_training) in two real processes joined by a real gloo
process group, as Ray Train's workers run it in the sweep, with a reporter that does with
checkpoints what the sweep's does (rank 0 writes them, every rank loads the newest) minus Ray and
MLflow; a killed rank is restarted the way Ray Train does it: the whole group, from the newest
checkpoint. A hang fails the group's deadline (GROUP_DEADLINE_S), far below the process group's
30-minute timeout. Faults are injected into one rank with train.inject.rank.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helix_sweep.run import plan_trials
from helix_sweep.training import checkpoints_on_disk, load_newest, require_prepared, save_state
from helix_sweep.training.checkpoint import checkpoint_name
from helix_sweep.training.distributed import StepFlags, agree, all_gather_states, collective_device
from helix_sweep.training.loop import run_training

WORLD = 2
GROUP_DEADLINE_S = 150  # one launch of the ranks: ~4 CPU s each, ~50 s wall on a 2-core machine at load 25
TIMING = ("epoch_seconds", "samples_per_s", "peak_mem_mb", "_ts")


# ---- the device of a collective (unit: no process group) ----

def test_collective_device_follows_the_backend():
    """The RNG gather and the step's flags go where the process group's backend takes tensors.
    NCCL (CUDA only) cannot be built on a CPU machine, so its choice is checked here as a rule;
    tests/test_ddp_gpu.py runs it on a real NCCL group where a GPU is present."""
    gpu, cpu = torch.device("cuda", 1), torch.device("cpu")
    assert collective_device("nccl", gpu) == gpu  # a CPU tensor would fail under NCCL
    assert collective_device("gloo", gpu) == cpu  # gloo gathers CPU tensors without a device copy
    assert collective_device("gloo", cpu) == cpu
    assert collective_device("cpu:gloo,cuda:nccl", gpu) == cpu
    assert collective_device("mpi", gpu) == cpu
    assert collective_device("some_plugin", gpu) == gpu  # unknown backends: the trial's device


def test_one_worker_issues_no_collective():
    """World 1 (a one-worker trial, with or without a process group): the flags come back as they
    went in and the gather is the rank's own state. No process group exists in this process, so any
    collective would raise."""
    assert not torch.distributed.is_initialized()
    flags = StepFlags(nonfinite=True, oom=False, checkpoint=True)
    assert agree(flags, 1, torch.device("cpu")) is flags
    state = torch.Generator().manual_seed(3).get_state()
    assert all_gather_states(state, 1, torch.device("cpu"))[0] is state


# ---- two ranks on gloo ----

class DiskReporter:
    """Checkpoints as the sweep's reporter keeps them (rank 0 writes <run_dir>/epoch*-step*/state.pt,
    every rank loads the newest at start), and a record of what each rank saw."""

    def __init__(self, rank: int, world_size: int, run_dir: Path):
        self.rank, self.world_size, self.run_dir = rank, world_size, run_dir
        self.record = {"resumed_at": None, "commits": [], "finished": [], "augment_rng": []}

    def load(self):
        found = load_newest(checkpoints_on_disk(self.run_dir))
        if found:
            progress = found[1]["progress"]
            self.record["resumed_at"] = [progress["epoch"], progress["step_in_epoch"], progress["global_step"]]
        return found[1] if found else None

    def start(self, progress, trial):
        return "test-run"

    def commit(self, state, epoch, progress):
        final = progress.status != "running"
        self.record["commits"].append({"step": progress.global_step, "mid_epoch": epoch is None and not final})
        self.record["augment_rng"].append(len({bytes(s.numpy()) for s in state["augment_rng"]}))
        if self.rank == 0:
            save_state(state, self.run_dir / checkpoint_name(progress.epoch, progress.global_step, final))

    def finish(self, progress, trial):
        self.record["finished"].append({"status": progress.status, "stop_reason": trial.stop_reason,
                                        "global_step": progress.global_step,
                                        "nonfinite_total": progress.nonfinite_total,
                                        "history": [{k: v for k, v in e.items() if k not in TIMING}
                                                    for e in progress.history]})


def _rank_main(rank: int, world: int, backend: str, port: int, spec, run_dir: str, out_dir: str) -> None:
    """One Ray Train worker's life: a process group, run_training, and what it did written to out_dir."""
    import torch.distributed as dist
    from torch.optim.optimizer import register_optimizer_step_post_hook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # as the sweep's workers (cpus_per_worker=1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)  # the default 30-minute timeout, as Ray's
    stepped = []  # every optimizer step this process takes, counted by torch itself
    register_optimizer_step_post_hook(lambda opt, args, kwargs: stepped.append(opt))
    reporter = DiskReporter(rank, world, Path(run_dir))
    try:
        run_training(spec, reporter)
    finally:
        dist.destroy_process_group()
    out = Path(out_dir)
    reporter.record["optimizer_steps"] = len(stepped)
    reporter.record["cpu_s"] = time.process_time()  # this rank's CPU time (the wall time depends on the load)
    (out / f"rank{rank}.json").write_text(json.dumps(reporter.record))
    params = [p.detach().cpu() for g in stepped[-1].param_groups for p in g["params"]] if stepped else []
    torch.save(params, out / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_group(spec, run_dir: Path, out_dir: Path, world: int = WORLD, backend: str = "gloo") -> list[int]:
    """The ranks' exit codes. A rank that dies takes the group down (Ray Train tears the worker group
    down too); past GROUP_DEADLINE_S the ranks are killed and the test fails as hung."""
    import multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    # forked from a server that imported torch, the loop and the data code once (~10 s per process on
    # a loaded 2-core machine), never used torch's thread pools (which a fork would not survive)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "scipy.signal", "helix_sweep.training.loop", "helix_sweep.data.synthetic",
                                __name__])
    port = _free_port()
    ranks = [ctx.Process(target=_rank_main, args=(r, world, backend, port, spec, str(run_dir), str(out_dir)),
                         daemon=True) for r in range(world)]
    for p in ranks:
        p.start()
    deadline = time.monotonic() + GROUP_DEADLINE_S
    try:
        while any(p.exitcode is None for p in ranks):
            if any(p.exitcode not in (None, 0) for p in ranks):
                break  # a dead rank: the others may wait in a collective for it; stop them
            if time.monotonic() > deadline:
                raise AssertionError(f"the ranks hung: still running after {GROUP_DEADLINE_S} s")
            time.sleep(0.1)
    finally:
        for p in ranks:
            if p.exitcode is None:
                p.kill()
            p.join(10)
    return [p.exitcode for p in ranks]


def results(out_dir: Path, world: int = WORLD) -> list[dict]:
    found = [{**json.loads((out_dir / f"rank{r}.json").read_text()),
              "params": torch.load(out_dir / f"rank{r}.pt")} for r in range(world)]
    print(f"{out_dir.name}: CPU s per rank", [round(r["cpu_s"], 1) for r in found])
    return found


@pytest.fixture(scope="module")
def base_spec(tmp_path_factory):
    return plan_spec(tmp_path_factory.mktemp("ddp"))


def plan_spec(workdir: Path):
    """A 2-worker trial of the smoke grid: 600 training clips, per-rank batch 50, 6 steps an epoch."""
    _, [spec] = plan_trials([f"workdir={workdir}", "datasets=[synth-commands]", "variants=[helix-mel]",
                             "resources.num_workers=2", "train.batch_size=100", "train.deterministic=true"])
    require_prepared(spec.data_root, spec.dataset)
    return spec


def with_train(spec, **train):
    """The trial with these train settings (inject: fault injection), as key=value overrides give them."""
    return replace(spec, train=replace(spec.train, **train))


def same_params(a: list, b: list) -> bool:
    return len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.timeout(300)
def test_nan_on_one_rank_skips_the_step_on_both(base_spec, tmp_path):
    spec = with_train(base_spec, epochs=1, inject={"nan_at_step": 2, "rank": 1})
    assert run_group(spec, tmp_path / "run", tmp_path / "out") == [0, 0]
    r0, r1 = results(tmp_path / "out")
    steps = 6  # one epoch; rank 0's own loss was finite at step 2, but it skips with rank 1
    for r in (r0, r1):
        [end] = r["finished"]
        assert end["status"] == "finished" and end["global_step"] == steps and end["nonfinite_total"] == 1
        assert r["optimizer_steps"] == steps - 1
    assert same_params(r0["params"], r1["params"])  # the ranks stepped together: same weights


@pytest.mark.timeout(300)
def test_nan_on_one_rank_past_the_limit_diverges_both_once(base_spec, tmp_path):
    spec = with_train(base_spec, epochs=2, max_nonfinite_steps=3, inject={"nan_from_step": 2, "rank": 1})
    assert run_group(spec, tmp_path / "run", tmp_path / "out") == [0, 0]  # both ended, neither hung
    r0, r1 = results(tmp_path / "out")
    # steps 2, 3, 4 skipped on both ranks; the third in a row ends the trial on both, at the same step
    for r in (r0, r1):
        [end] = r["finished"]  # one terminal status per rank (rank 0's is the one the sweep records)
        assert end["status"] == "diverged" and end["global_step"] == 5, end
        assert end["stop_reason"] == "3 non-finite losses in a row at step 5"
        assert r["optimizer_steps"] == 2
    assert same_params(r0["params"], r1["params"])


@pytest.mark.timeout(300)
def test_out_of_memory_on_one_rank_stops_both(base_spec, tmp_path):
    spec = with_train(base_spec, epochs=1, inject={"oom_at_step": 2, "rank": 1})
    assert run_group(spec, tmp_path / "run", tmp_path / "out") == [0, 0]
    r0, r1 = results(tmp_path / "out")
    for r in (r0, r1):
        [end] = r["finished"]
        assert end["status"] == "oom" and end["global_step"] == 2, end
        assert r["optimizer_steps"] == 2
    # rank 0, whose reason the sweep records, says where the memory ran out
    assert "CUDA out of memory on another of the 2 ranks" in r0["finished"][0]["stop_reason"]
    assert "injected for a test" in r1["finished"][0]["stop_reason"]


@pytest.mark.timeout(540)
def test_slow_rank_checkpoints_together_and_a_killed_rank_resumes_bit_identical(base_spec, tmp_path):
    # a checkpoint interval of ~1.5 steps (each step waits for rank 1's 0.25 s sleep): the clock fires
    # mid-epoch several times; rank 1 is SIGKILLed at step 9 (mid epoch 2) and the group restarted
    slow = {"rank": 1, "sleep_per_step": 0.25}
    spec = with_train(base_spec, epochs=2, checkpoint_minutes=0.006,
                         inject={**slow, "kill_at_step": 9, "kill_marker": str(tmp_path / "killed")})
    reference = replace(spec, train=replace(spec.train, inject=slow))  # the same trial, never killed

    assert run_group(reference, tmp_path / "ref", tmp_path / "ref-out") == [0, 0]
    ref0, ref1 = results(tmp_path / "ref-out")
    mid = [c["step"] for c in ref0["commits"] if c["mid_epoch"]]
    assert len(mid) >= 3, ref0["commits"]  # the interval fired several times mid-epoch
    assert ref0["commits"] == ref1["commits"]  # at the same steps on both ranks
    assert set(ref0["augment_rng"]) == {WORLD}  # each checkpoint holds both ranks' augmentation streams

    codes = run_group(spec, tmp_path / "run", tmp_path / "killed-out")
    assert codes[1] == -9 and (tmp_path / "killed.9").exists(), codes  # rank 1 died by SIGKILL at step 9
    assert run_group(spec, tmp_path / "run", tmp_path / "out") == [0, 0]  # restarted from the newest checkpoint
    r0, r1 = results(tmp_path / "out")
    assert r0["resumed_at"] == r1["resumed_at"] and r0["resumed_at"][0] == 1, r0["resumed_at"]  # inside epoch 2
    assert r0["commits"] == r1["commits"]
    # bit-identical to the uninterrupted run: both ranks' weights, and the metrics rank 0 reports
    # (a checkpoint holds rank 0's progress: its train loss is over rank 0's share of the batches)
    assert same_params(r0["params"], ref0["params"]) and same_params(r1["params"], ref1["params"])
    assert r0["finished"][0]["history"] == ref0["finished"][0]["history"]
    print("resumed at [epoch, step in epoch, global step]", r0["resumed_at"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_worker_sweep_through_ray(tmp_path):
    """The same through the sweep (Ray Tune + Ray Train with 2 gloo workers + MLflow): a trial whose
    rank 1 is SIGKILLed mid-epoch is restarted by Ray Train and ends bit-identical to an uninterrupted
    2-rank run; a trial whose rank 1 has NaN losses ends diverged, recorded once, the sweep goes on.
    ~3-4 min on a loaded 2-core machine (two 2-worker trials, one after the other)."""
    from helix_sweep.sweep.tracking import stop_tracking_server
    from helix_sweep.training import load_state
    from sweep_process import run, trial_runs

    workdir = tmp_path / "sweep"
    marker = tmp_path / "killed"
    args = ["datasets=[synth-commands]", "variants=[helix-mel,attention-mel]", "resources.num_workers=2",
            "train.batch_size=100", "train.deterministic=true", "train.epochs=2", "train.checkpoint_minutes=0.0",
            "train.max_nonfinite_steps=3",
            "train.inject={per_trial: {helix-mel: {kill_at_step: 8, kill_marker: '" + str(marker) + "', rank: 1}, "
            "attention-mel: {nan_from_step: 2, rank: 1}}}"]
    try:
        proc = run(workdir, *args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs = {r.data.tags["trial_key"]: r for r in trial_runs(workdir)}
    finally:
        stop_tracking_server(workdir)
    assert (tmp_path / "killed.8").exists(), "rank 1 was not killed"
    killed, diverged = runs["synth-commands/helix-mel/split"], runs["synth-commands/attention-mel/split"]
    assert len(runs) == 2 and killed.data.tags["status"] == "finished" and int(killed.data.tags["resumes"]) >= 1
    assert diverged.data.tags["status"] == "diverged"
    assert diverged.data.tags["stop_reason"] == "3 non-finite losses in a row at step 5"

    _, specs = plan_trials([f"workdir={workdir}", *args])
    spec = next(s for s in specs if s.key == "synth-commands/helix-mel/split")
    reference = with_train(spec, inject={})
    assert run_group(reference, tmp_path / "ref", tmp_path / "ref-out") == [0, 0]
    [ref_final] = (tmp_path / "ref").glob("*-final")
    [final] = workdir.glob("experiments/*/trials/synth-commands__helix-mel__split/*-final")
    ref_state, state = load_state(ref_final), load_state(final)
    for name, tensor in ref_state["model"].items():
        assert torch.equal(tensor, state["model"][name]), name
    strip = lambda h: [{k: v for k, v in e.items() if k not in TIMING} for e in h]  # noqa: E731
    assert strip(ref_state["progress"]["history"]) == strip(state["progress"]["history"])
