"""The checkpoint module on its own: atomic writes, a truncated checkpoint never resumed from,
the keep-last-N pruning policy, and the storage writability probe."""

import os

import pytest
import torch

from helix_sweep.training.checkpoint import (BEST_DIR, CheckpointStorageError, check_writable, checkpoint_name,
                                             checkpoints_on_disk, load_newest, load_state, prune, save_state,
                                             storage_error, to_prune)


def state(step: int) -> dict:
    return {"model": {"w": torch.full((64, 64), float(step))}, "progress": {"global_step": step}}


def test_save_is_atomic_and_loads_weights_only(tmp_path):
    save_state(state(3), tmp_path / "a")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["state.pt"]  # no temp file left behind
    assert load_state(tmp_path / "a")["progress"]["global_step"] == 3


def test_a_truncated_newest_checkpoint_is_skipped_for_the_one_before(tmp_path):
    for step in (10, 20, 30):
        save_state(state(step), tmp_path / checkpoint_name(1, step, final=False))
    newest = tmp_path / checkpoint_name(1, 30, final=False) / "state.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a copy cut short by a full disk
    warnings = []
    path, loaded = load_newest(checkpoints_on_disk(tmp_path), warn=warnings.append)
    assert path.name == checkpoint_name(1, 20, final=False) and loaded["progress"]["global_step"] == 20
    assert len(warnings) == 1 and str(newest.parent) in warnings[0]


def test_checkpoints_sort_newest_first_with_final_before_its_twin(tmp_path):
    names = [checkpoint_name(1, 9, False), checkpoint_name(2, 18, False), checkpoint_name(2, 18, True),
             checkpoint_name(1, 12, False)]
    for n in names:
        save_state(state(0), tmp_path / n)
    (tmp_path / "epoch0003-step00000027").mkdir()  # no state file: not a checkpoint
    assert [p.name for p in checkpoints_on_disk(tmp_path)] == [
        "epoch0002-step00000018-final", "epoch0002-step00000018", "epoch0001-step00000012", "epoch0001-step00000009"]


def test_prune_keeps_the_newest_and_what_ray_still_lists():
    names = [checkpoint_name(e, s, False) for e, s in [(1, 10), (2, 20), (3, 30), (3, 35), (4, 40)]]
    # from before a restart Ray lists 20 and 30 (its last two); the newest two are 35 and 40
    assert to_prune(names, keep=2, protected={names[1], names[2]}) == [names[0]]
    assert to_prune(names, keep=2, protected=set()) == names[:3]
    assert to_prune(names, keep=10, protected=set()) == []


def test_prune_deletes_on_disk_but_never_the_best_copy(tmp_path):
    for step in (10, 20, 30):
        save_state(state(step), tmp_path / checkpoint_name(1, step, final=False))
    save_state(state(10), tmp_path / BEST_DIR)
    removed = prune(tmp_path, keep=1, protected={checkpoint_name(1, 20, False)})
    assert [p.name for p in removed] == [checkpoint_name(1, 10, False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_DIR, checkpoint_name(1, 20, False),
                                                          checkpoint_name(1, 30, False)]


def test_check_writable_names_the_directory(tmp_path):
    check_writable(tmp_path / "new" / "run")  # created when missing
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=str(blocker / "run")):
        check_writable(blocker / "run")  # a path under a regular file: not writable, even for root
    assert os.listdir(tmp_path / "new" / "run") == []


def test_storage_error_names_the_directory_and_the_intact_checkpoint(tmp_path):
    assert "the previous checkpoint (none yet)" in str(storage_error("k", tmp_path, OSError(30, "Read-only")))
    save_state(state(10), tmp_path / checkpoint_name(1, 10, final=False))
    error = storage_error("ds/v/1", tmp_path, OSError(28, "No space left on device"))
    assert isinstance(error, CheckpointStorageError)
    assert str(error).startswith(f"ds/v/1: checkpoint storage {tmp_path} is not writable ([Errno 28] No space")
    assert f"the previous checkpoint {tmp_path / 'epoch0001-step00000010'} is intact" in str(error)


def test_worker_prunes_only_checkpoints_from_before_it_started(tmp_path):
    # Ray's record drops a checkpoint before its controller deletes it; a worker deleting it in
    # between failed the controller ("Path not found"). The worker's own pruning is for checkpoints
    # from before a restart, which Ray never deletes.
    import json
    from types import SimpleNamespace

    from helix_sweep.sweep.worker import RAY_SNAPSHOT, RayMlflowReporter, TrainSession

    for name in ("epoch0001-step00000010", "epoch0002-step00000020", "epoch0003-step00000030",
                 "epoch0004-step00000040", "epoch0005-step00000050"):
        (tmp_path / name).mkdir()
    reporter = object.__new__(RayMlflowReporter)  # the pruning alone: no Ray context needed
    reporter.run_dir, reporter.spec = str(tmp_path), SimpleNamespace(key="k", train=SimpleNamespace(keep_checkpoints=2))
    reporter.session = TrainSession()
    reporter.found_at_start = {"epoch0001-step00000010", "epoch0002-step00000020"}  # epoch 2 still in Ray's record
    (tmp_path / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": n} for n in ("epoch0002-step00000020", "epoch0004-step00000040",
                                             "epoch0005-step00000050")]}))
    reporter.prune()
    # epoch 1: from before the start and unlisted, pruned; epoch 3: reported since, unlisted (Ray is
    # about to delete it), left to Ray; epoch 2: listed
    assert sorted(p.name for p in tmp_path.glob("epoch*")) == [
        "epoch0002-step00000020", "epoch0003-step00000030", "epoch0004-step00000040", "epoch0005-step00000050"]


def test_actor_session_writes_the_checkpoint_whole_before_reporting_and_prunes_all_but_the_newest(tmp_path):
    # a trial trained in Tune's actor (trainable.in_actor) has no Ray Train to copy and record its
    # checkpoints: the session puts each in the run directory itself, and Tune hears of it only then
    from types import SimpleNamespace

    from helix_sweep.sweep.worker import RAY_SNAPSHOT, ActorSession, RayMlflowReporter

    seen = []

    class Recording(ActorSession):
        def report(self, metrics):  # what Tune would get, and what the run directory held by then
            seen.append((metrics["step"], sorted(p.name for p in tmp_path.iterdir())))

    session = Recording()
    state = lambda step: {"progress": {"global_step": step}, "w": torch.full((3,), float(step))}
    for step in (10, 20, 30):
        session.persist(state(step), {"step": step}, checkpoint_name(1, step, False), str(tmp_path))
    assert [s for s, _ in seen] == [10, 20, 30]
    assert all(checkpoint_name(1, s, False) in names and not any(n.endswith(".tmp") for n in names)
               for s, names in seen)
    # the same step again (a start that died between its write and its report): replaced, not doubled
    (tmp_path / f".{checkpoint_name(1, 30, False)}.tmp").mkdir()  # and a temp folder a kill left
    session.persist(state(31), {"step": 30}, checkpoint_name(1, 30, False), str(tmp_path))
    assert load_state(tmp_path / checkpoint_name(1, 30, False))["w"][0] == 31
    assert not list(tmp_path.glob(".*.tmp"))

    reporter = object.__new__(RayMlflowReporter)
    reporter.run_dir, reporter.spec = str(tmp_path), SimpleNamespace(key="k", train=SimpleNamespace(keep_checkpoints=2))
    reporter.session, reporter.found_at_start = session, set()
    (tmp_path / RAY_SNAPSHOT).write_text('{"checkpoint_results": [{"checkpoint_dir_name": "epoch0001-step00000010"}]}')
    reporter.prune()  # no Ray record counts here: only the newest two stay
    assert [p.name for p in checkpoints_on_disk(tmp_path)] == [checkpoint_name(1, 30, False), checkpoint_name(1, 20, False)]
