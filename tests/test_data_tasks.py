"""open_task on prepared fixtures: the contract, folds, official splits, concat, speaker stitching."""

import json
import shutil

import numpy as np
import pytest
import torch

from data_fixtures import make_esc50, make_librispeech, make_speechcommands, make_urbansound8k, make_voxpopuli, write_audio
from helix_sweep.data import DATASETS, DatasetNotPrepared, open_task, require_prepared
from helix_sweep.data.audio import decode_file, fit_length
from helix_sweep.data.prepare import prepare


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("tasks")
    src = base / "src"
    esc = make_esc50(src / "esc", targets=(0, 1, 2), folds=(1, 2, 3, 4, 5))
    write_audio(esc / "audio" / "1-100010-A-0.wav", 5.5, 44100, seed=1)  # longer than 5 s: cropped
    write_audio(esc / "audio" / "2-100020-A-0.wav", 3.0, 44100, seed=2)  # shorter: padded
    make_urbansound8k(src / "us8k")
    make_speechcommands(src / "sc", takes=3)
    make_librispeech(src / "ls", utterances=5)
    make_voxpopuli(src / "vp")
    r = base / "root"
    for name, sub in [("esc50", "esc"), ("urbansound8k", "us8k"), ("speechcommands", "sc"), ("librispeech", "ls"), ("voxpopuli", "vp")]:
        prepare(name, src / sub, r, progress=False)
    return r, src


def test_datasets_names():
    assert set(DATASETS) == {"esc50", "urbansound8k", "speechcommands", "speechcommands-concat", "librispeech", "voxpopuli",
                             "synth-textures", "synth-commands", "synth-concat", "synth-speaker"}  # fmt: skip


def test_esc50_folds_and_batches(root):
    r, src = root
    seen_test = []
    for fold in range(1, 6):
        task = open_task(r, "esc50", fold=fold)
        assert (task.num_classes, task.clip_samples, task.sample_rate) == (50, 80000, 16000)
        assert task.val is None and len(task.test) == 3 and len(task.train) == 12
        assert all(cid.startswith(f"{fold}-") for cid in task.test.clip_ids)
        assert not any(cid.startswith(f"{fold}-") for cid in task.train.clip_ids)
        seen_test += list(task.test.clip_ids)
        assert task.info["n_train"] == 12 and task.info["fold"] == fold and json.dumps(task.info)
    assert len(set(seen_test)) == 15  # every clip is tested exactly once across folds
    task = open_task(r, "esc50", fold=1)
    x, y = task.test.get_batch(range(len(task.test)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (3, 80000)
    for b, cid in enumerate(task.test.clip_ids):
        expect = fit_length(decode_file(src / "esc" / "ESC-50-master" / "audio" / f"{cid}.wav").pcm, 80000) / 32768
        np.testing.assert_allclose(x[b].numpy(), expect, atol=1e-7)
        assert y[b] == int(cid.split("-")[-1]) == task.test.labels[b]
    long_clip = list(task.test.clip_ids).index("1-100010-A-0")
    assert decode_file(src / "esc" / "ESC-50-master" / "audio" / "1-100010-A-0.wav").pcm.shape[0] == 88000  # cropped to 80000 above
    task2 = open_task(r, "esc50", fold=2)
    short = list(task2.test.clip_ids).index("2-100020-A-0")
    x2, _ = task2.test.get_batch([short])
    assert torch.all(x2[0, 48000:] == 0) and torch.any(x2[0, :48000] != 0)  # padded with zeros at the end
    assert long_clip >= 0


def test_random_index_batches_match_sequential(root):
    task = open_task(root[0], "urbansound8k", fold=4)
    assert task.clip_samples == 64000 and task.num_classes == 10
    idx = np.random.default_rng(0).permutation(len(task.train))[:7]
    xb, yb = task.train.get_batch(idx)
    for b, i in enumerate(idx):
        xi, yi = task.train.get_batch([i])
        assert torch.equal(xb[b], xi[0]) and yb[b] == yi[0]
    with pytest.raises(IndexError, match="indices must lie in"):
        task.train.get_batch([len(task.train)])


def test_val_fraction_is_stratified_and_seeded(root):
    a = open_task(root[0], "esc50", fold=1, seed=3, val_fraction=0.25)
    b = open_task(root[0], "esc50", fold=1, seed=3, val_fraction=0.25)
    c = open_task(root[0], "esc50", fold=1, seed=4, val_fraction=0.25)
    assert len(a.val) == 3 and len(a.train) == 9 and sorted(a.val.labels) == [0, 1, 2]
    assert list(a.val.clip_ids) == list(b.val.clip_ids)
    assert set(a.val.clip_ids).isdisjoint(a.train.clip_ids) and set(a.val.clip_ids).isdisjoint(a.test.clip_ids)
    assert a.info["composition_sha256"] != c.info["composition_sha256"] or list(a.val.clip_ids) == list(c.val.clip_ids)


def test_speechcommands_official_splits(root):
    task = open_task(root[0], "speechcommands")
    assert task.num_classes == 35 and task.clip_samples == 16000
    assert (len(task.train), len(task.val), len(task.test)) == (27, 9, 9)
    assert all(c.split("/")[1].startswith("0a1b2c3d") for c in task.test.clip_ids)
    assert all(c.split("/")[1].startswith("1f2e3d4c") for c in task.val.clip_ids)
    x, y = task.train.get_batch(range(len(task.train)))
    assert x.shape == (27, 16000)
    assert [task.label_names[i] for i in y] == [c.split("/")[0] for c in task.train.clip_ids]


def test_speechcommands_concat(root):
    task = open_task(root[0], "speechcommands-concat", seed=5, concat_n=4)
    plain = open_task(root[0], "speechcommands")
    assert task.clip_samples == 4 * 16000 and task.first_clip_samples == task.info["first_clip_samples"] == 16000
    assert task.pool_tokens is None  # K per frontend comes from the grid (pool: first_clip), not from the data
    assert list(task.train.labels) == list(plain.train.labels)  # label of the FIRST clip
    x, y = task.train.get_batch([0, 1])
    first, _ = plain.train.get_batch([0, 1])
    assert torch.equal(x[:, :16000], first)
    ex = task.train.examples
    train_rows = set(plain.train.examples.clip.tolist())
    assert all(set(ex.clip[ex.ptr[e] : ex.ptr[e + 1]].tolist()) <= train_rows for e in range(len(task.train)))
    again = open_task(root[0], "speechcommands-concat", seed=5, concat_n=4)
    other = open_task(root[0], "speechcommands-concat", seed=6, concat_n=4)
    assert torch.equal(again.train.get_batch([3])[0], task.train.get_batch([3])[0])
    assert task.info["composition_sha256"] == again.info["composition_sha256"] != other.info["composition_sha256"]
    side = json.loads(open(task.info["construction"]).read())
    assert side["options"]["concat_n"] == 4 and side["seed"] == 5 and side["options"]["pool_tokens"] is None
    assert open_task(root[0], "speechcommands-concat").clip_samples == 10 * 16000


@pytest.mark.parametrize("dataset", ["librispeech", "voxpopuli"])
def test_speaker_stitching(root, dataset):
    task = open_task(root[0], dataset, seed=1, clip_seconds=2.0)
    assert task.clip_samples == 32000
    assert set(task.train.labels) == set(task.test.labels) == set(range(task.num_classes))  # closed set
    for cs in (task.train, task.test):
        ex = cs.examples
        for e in range(len(cs)):
            segs = range(ex.ptr[e], ex.ptr[e + 1])
            assert len({cs.examples.labels[e]}) == 1
            ends = [ex.dest[s] + ex.stop[s] - ex.start[s] for s in segs]
            assert [ex.dest[s] for s in segs] == [0] + ends[:-1]  # contiguous
            assert ends[-1] <= 32000
    train_utts = set(task.train.examples.clip.tolist())
    test_utts = set(task.test.examples.clip.tolist())
    assert train_utts.isdisjoint(test_utts)
    # every utterance's audio is used exactly once with partial_clip="pad"
    lengths = {}
    for cs in (task.train, task.test):
        ex = cs.examples
        for c, a, z in zip(ex.clip, ex.start, ex.stop):
            lengths[c] = lengths.get(c, 0) + (z - a)
    store = task.train.store
    assert all(lengths[c] == store.lengths[c] for c in lengths) and len(lengths) == len(store)
    dropped = open_task(root[0], dataset, seed=1, clip_seconds=2.0, partial_clip="drop")
    assert len(dropped.train) < len(task.train)
    last = dropped.train.examples
    assert all(last.dest[last.ptr[e + 1] - 1] + last.stop[last.ptr[e + 1] - 1] - last.start[last.ptr[e + 1] - 1] == 32000 for e in range(len(dropped.train)))
    x, y = task.train.get_batch([0])
    assert x.shape == (1, 32000)


def test_speaker_train_share_per_speaker(root):
    task = open_task(root[0], "librispeech", seed=0, clip_seconds=1.0, val_fraction=0.25)
    ex = task.test.examples
    test_utts = set(ex.clip.tolist())
    assert len(test_utts) == 3 * 2  # round(0.2 * 10) utterances per speaker
    assert task.val is not None and set(task.val.labels) == {0, 1, 2}


def test_contract_errors(root, tmp_path):
    r = root[0]
    with pytest.raises(ValueError, match=r"fold=6 out of range; valid folds are 1..5"):
        open_task(r, "esc50", fold=6)
    with pytest.raises(ValueError, match="pass fold=1..10"):
        open_task(r, "urbansound8k")
    with pytest.raises(ValueError, match="no folds"):
        open_task(r, "speechcommands", fold=1)
    with pytest.raises(ValueError, match=r"unknown task option\(s\) \['bogus', 'concat_n'\]"):
        open_task(r, "esc50", fold=1, bogus=1, concat_n=3)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        open_task(r, "mnist")
    with pytest.raises(ValueError, match="official validation split"):
        open_task(r, "speechcommands", val_fraction=0.1)
    with pytest.raises(ValueError, match="partial_clip"):
        open_task(r, "librispeech", partial_clip="maybe")
    with pytest.raises(DatasetNotPrepared, match="prepare librispeech"):
        require_prepared(tmp_path / "empty-root", "librispeech")
    assert require_prepared(r, "librispeech") == r / "librispeech"
    with pytest.raises(DatasetNotPrepared) as err:
        open_task(tmp_path / "empty-root", "esc50", fold=1)
    msg = str(err.value)
    assert "'esc50'" in msg and str(tmp_path / "empty-root") in msg and "missing" in msg
    assert f"python -m helix_sweep.data prepare esc50 --source <dir|archive|url> --root {tmp_path / 'empty-root'}" in msg
    # half-prepared: shards there, marker gone (a killed prepare)
    half = tmp_path / "half"
    shutil.copytree(r / "speechcommands", half / "speechcommands")
    (half / "speechcommands" / "prepared.json").unlink()
    with pytest.raises(DatasetNotPrepared, match="half-prepared.*prepare speechcommands"):
        open_task(half, "speechcommands-concat")
    # a shard deleted after prepare
    shutil.copytree(r / "esc50", half / "esc50")
    next((half / "esc50" / "shards").glob("*.arrow")).unlink()
    with pytest.raises(DatasetNotPrepared):
        open_task(half, "esc50", fold=1)


def test_clipset_pickles_without_mapped_memory(root):
    import pickle

    task = open_task(root[0], "esc50", fold=3)
    x, _ = task.train.get_batch([2])
    clone = pickle.loads(pickle.dumps(task.train))
    assert len(pickle.dumps(task.train)) < 100_000
    assert torch.equal(clone.get_batch([2])[0], x)
