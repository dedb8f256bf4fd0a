"""A truncated schedule (train.stop_after_epochs): the Concat Speech Commands trials of grid=full run a
100-epoch cosine schedule and stop after epoch 24 with the learning rate where a 100-epoch schedule has it
at epoch 24; a resume from a mid-run checkpoint ends in the same place; the plan counts only the epochs
run. The real training loop (run_training) on a tiny model and an in-memory task: no Ray, no MLflow."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from helix_sweep.config import ModelConfig
from helix_sweep.run import plan_trials
from helix_sweep.training import budget, loop

N_TRAIN, N_TEST, CLASSES, SAMPLES, BATCH = 32, 16, 4, 800, 16  # 0.05 s clips: 5 raw tokens; 2 steps per epoch


class Clips:
    """The ClipSet surface the loop uses: len() and get_batch(indices) -> ((B, T) audio, (B,) labels)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, CLASSES, (n,), generator=g)
        self.x = torch.randn(n, SAMPLES, generator=g) * 0.1 + 0.05 * self.y[:, None]  # (n, T)

    def __len__(self) -> int:
        return len(self.y)

    def get_batch(self, indices):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return self.x[idx], self.y[idx]


def tiny_task(*args, **kwargs):
    return SimpleNamespace(train=Clips(N_TRAIN, 1), test=Clips(N_TEST, 2), val=None, num_classes=CLASSES,
                           label_names=[str(c) for c in range(CLASSES)], clip_samples=SAMPLES,
                           info={"n_train": N_TRAIN, "n_test": N_TEST})


class Recorder:
    """An in-process reporter: keeps every committed state; resumes from `start_from` when given."""

    rank, world_size = 0, 1

    def __init__(self, start_from: dict | None = None):
        self.start_from, self.states = start_from, []

    def load(self):
        return self.start_from

    def start(self, progress, trial):
        self.trial = trial
        return "memory"

    def commit(self, state, epoch, progress):
        self.states.append(copy.deepcopy(state))  # as the worker's save: not the live tensors

    def finish(self, progress, trial):
        self.progress = progress


@pytest.fixture(scope="module")
def concat_spec():
    """grid=full's Concat Speech Commands trial (its train section as the study runs it) on a tiny model."""
    _, trials = plan_trials(["grid=full", "datasets=[speechcommands-concat]", "variants=[helix-raw]"])
    [spec] = trials
    assert (spec.train.epochs, spec.train.stop_after_epochs) == (100, 24)
    return replace(spec, model=ModelConfig(d_model=8, num_heads=2, attention_impl="naive"), pattern="A",
                   train=replace(spec.train, batch_size=BATCH, checkpoint_minutes=1e9))


def cosine_lr(lr: float, min_lr: float, step: int, total: int) -> float:
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * step / total)) / 2


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def test_concat_trials_stop_after_24_epochs_of_a_100_epoch_schedule(concat_spec, monkeypatch, one_thread):
    monkeypatch.setattr(loop, "open_task", tiny_task)
    t = concat_spec.train
    run = Recorder()
    progress = loop.run_training(concat_spec, run)
    steps = N_TRAIN // t.batch_size  # optimizer steps per epoch
    assert progress.status == "finished" and progress.epoch == 24 and progress.global_step == 24 * steps
    assert [h["epoch"] for h in progress.history] == list(range(1, 25))
    # the LR after each epoch is the 100-epoch schedule's, not one annealed to min_lr by epoch 24
    for h in progress.history:
        assert h["lr"] == pytest.approx(cosine_lr(t.lr, t.min_lr, h["epoch"] * steps, 100 * steps), rel=1e-6)
    last = progress.history[-1]["lr"]
    assert last == pytest.approx(cosine_lr(t.lr, t.min_lr, 24, 100), rel=1e-6) and last > 0.86 * t.lr
    assert run.states[-1]["scheduler"]["T_max"] == 100 * steps  # the checkpoint keeps the whole schedule
    assert run.states[-1]["progress"]["status"] == "finished"

    # resumed from the epoch-12 checkpoint: the same 24 epochs, the same LR at the end, the same weights
    mid = next(s for s in run.states if s["progress"]["epoch"] == 12)
    resumed = Recorder(start_from=mid)
    again = loop.run_training(concat_spec, resumed)
    assert again.status == "finished" and again.epoch == 24 and again.history[-1]["lr"] == last
    for name, tensor in run.states[-1]["model"].items():
        torch.testing.assert_close(resumed.states[-1]["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    # a relaunch after the final checkpoint finishes at once without training
    done = Recorder(start_from=run.states[-1])
    assert loop.run_training(concat_spec, done).epoch == 24 and done.states == []


def test_the_plan_counts_only_the_epochs_run(concat_spec):
    full = replace(concat_spec, train=replace(concat_spec.train, stop_after_epochs=None))
    assert budget.as_trial(concat_spec).epochs == 24 and budget.as_trial(full).epochs == 100
    hours, full_hours = budget.estimate_gpu_hours(concat_spec), budget.estimate_gpu_hours(full)
    assert hours == pytest.approx(full_hours * 24 / 100, rel=1e-9)
