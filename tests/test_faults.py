"""Fault injection (train.inject): which trial a fault reaches, and that each kind fires only at its step."""

import pytest
import torch

from helix_sweep.training.faults import Faults


def test_trial_filter_and_per_trial_faults():
    inject = {"nan_at_step": 3, "trial": "helix", "per_trial": {"attention-mel": {"oom_at_step": 2},
                                                                 "attention": {"oom_at_step": 5}}}
    helix = Faults(inject, "synth-commands/helix-mel/split")
    other = Faults(inject, "synth-commands/mamba-mel/split")
    attention = Faults(inject, "synth-commands/attention-mel/split")
    loss = torch.tensor(1.0)
    assert torch.isnan(helix.loss(loss, 3)) and not torch.isnan(helix.loss(loss, 2))
    assert not torch.isnan(other.loss(loss, 3))  # inject.trial keeps the shared faults to helix trials
    assert not torch.isnan(attention.loss(loss, 3))
    attention.before_micro_step(5)  # the first matching per_trial part decides: step 2, not 5
    with pytest.raises(torch.cuda.OutOfMemoryError, match="injected"):
        attention.before_micro_step(2)


def test_nan_from_step_and_step_lists(tmp_path):
    faults = Faults({"nan_from_step": 4, "kill_at_step": [1, 3], "kill_marker": str(tmp_path / "k")}, "a/b/c")
    assert not torch.isnan(faults.loss(torch.tensor(1.0), 3))
    assert all(torch.isnan(faults.loss(torch.tensor(1.0), s)) for s in (4, 9))
    (tmp_path / "k.1").write_text("0")  # already killed once at step 1: not again
    faults.before_step(1)
    faults.before_step(2)  # no kill at a step the list does not name
    Faults().before_step(0)
    Faults().before_finish()


def test_oom_once_with_a_marker(tmp_path):
    faults = Faults({"oom_at_step": 1, "oom_marker": str(tmp_path / "oom")}, "a/b/c")
    faults.before_micro_step(0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        faults.before_micro_step(1)
    faults.before_micro_step(1)  # the marker says it already ran out of memory at step 1: not again
    assert (tmp_path / "oom.1").exists()
    always = Faults({"oom_at_step": 1}, "a/b/c")
    for _ in range(2):
        with pytest.raises(torch.cuda.OutOfMemoryError):
            always.before_micro_step(1)
