"""Fault injection (train.inject): which trial a fault reaches, and that each kind fires only at its step."""

import pytest
import torch

from helix_sweep.config import ConfigError, load_config
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


def test_rank_selects_one_ddp_rank():
    inject = {"nan_at_step": 3, "sleep_before_finish": 0.01, "rank": 1}
    on_rank1, on_rank0 = Faults(inject, "a/b/c", rank=1), Faults(inject, "a/b/c", rank=0)
    assert torch.isnan(on_rank1.loss(torch.tensor(1.0), 3))
    assert not torch.isnan(on_rank0.loss(torch.tensor(1.0), 3)) and on_rank0.faults == {}  # every fault, not one kind
    per_trial = Faults({"per_trial": {"helix": {"oom_at_step": 2, "rank": 1}}}, "synth/helix-mel/split", rank=0)
    per_trial.before_micro_step(2)  # a trial's own faults can name their rank too
    assert Faults({"nan_at_step": 3}, "a/b/c", rank=1).faults  # no rank: every rank


@pytest.mark.parametrize("inject,needle", [
    ("{nan_at_stp: 2}", "train.inject: unknown key(s) ['nan_at_stp']"),
    ("{per_trial: {helix: {sleep: 1}}}", "train.inject.per_trial.helix: unknown key(s) ['sleep']"),
    ("{rank: -1}", "train.inject.rank=-1: expected a DDP rank"),
    ("{rank: one}", "train.inject.rank='one': expected a DDP rank"),
    ("{rank: 1}", "rank 1 is not a rank of any trial (resources.num_workers=1"),
])
def test_inject_keys_are_checked_before_a_sweep(inject, needle):
    with pytest.raises(ConfigError) as err:
        load_config([f"train.inject={inject}"])
    assert needle in str(err.value)
    load_config(["resources.num_workers=2", "train.inject={rank: 1, sleep_per_step: 0.1}"])  # valid


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
