"""prepare: the five real layouts into shards + manifest; idempotence, restart, changed source, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from data_fixtures import (
    make_archive,
    make_esc50,
    make_librispeech,
    make_speechcommands,
    make_urbansound8k,
    make_voxpopuli,
    set_mtime_later,
    write_audio,
)
from helix_sweep.data import DatasetNotPrepared, open_task, require_prepared
from helix_sweep.data.audio import decode_file
from helix_sweep.data.layouts import PrepareError
from helix_sweep.data.prepare import prepare
from helix_sweep.data.shards import ClipStore

REQUIRED = ["clip_id", "label", "label_name", "fold", "split", "speaker", "source", "num_samples"]
REPO = Path(__file__).resolve().parents[1]


def manifest(ddir):
    return pq.read_table(ddir / "manifest.parquet").to_pylist()


def report(ddir):
    return json.loads((ddir / "prepare_report.json").read_text())


def store(ddir):
    done = json.loads((ddir / "prepared.json").read_text())
    rows = manifest(ddir)
    return ClipStore([ddir / "shards" / s for s in done["shards"]], [r["shard"] for r in rows], [r["row"] for r in rows])


def test_esc50(tmp_path):
    src = make_esc50(tmp_path / "src")
    ddir = prepare("esc50", tmp_path / "src", tmp_path / "root", progress=False)
    rows = manifest(ddir)
    assert [c for c in REQUIRED if c not in rows[0]] == []
    assert len(rows) == 10
    assert {(r["fold"], r["label"], r["label_name"]) for r in rows} == {(f, t, ["dog", "rooster"][t]) for f in range(1, 6) for t in (0, 1)}
    assert all(r["num_samples"] == 80000 and r["split"] == "all" and r["speaker"] is None for r in rows)
    assert all(r["source_sample_rate"] == 44100 for r in rows)
    st = store(ddir)
    for i, r in enumerate(rows):
        assert r["source"].startswith("audio/") and (src / r["source"]).is_file()
        np.testing.assert_array_equal(st.clip(i), decode_file(src / r["source"]).pcm)
    assert report(ddir)["entries"] == []


def test_urbansound8k_mixed_formats(tmp_path):
    src = make_urbansound8k(tmp_path / "src")
    ddir = prepare("urbansound8k", src.parent, tmp_path / "root", progress=False)
    rows = manifest(ddir)
    assert len(rows) == 30
    assert {r["source_subtype"] for r in rows} == {"PCM_16", "PCM_U8", "PCM_24", "FLOAT", "PCM_32"}
    assert {r["source_channels"] for r in rows} == {1, 2}
    assert {r["source_sample_rate"] for r in rows} >= {8000, 11025, 22050, 44100, 48000, 96000}
    assert {r["label_name"] for r in rows} == {"air_conditioner", "dog_bark", "siren"}
    assert {r["label"] for r in rows} == {0, 3, 8}
    assert sorted({r["fold"] for r in rows}) == list(range(1, 11))
    st = store(ddir)
    for i, r in enumerate(rows):
        info = sf.info(str(src / r["source"]))
        assert abs(r["num_samples"] - info.duration * 16000) <= 1
        np.testing.assert_array_equal(st.clip(i), decode_file(src / r["source"]).pcm)
    padded = {e["source"] for e in report(ddir)["entries"] if e["action"] == "padded"}
    assert padded == {r["source"] for r in rows if r["num_samples"] < 64000}


def test_speechcommands_official_lists(tmp_path):
    src = make_speechcommands(tmp_path / "src")
    ddir = prepare("speechcommands", src, tmp_path / "root", progress=False)
    rows = manifest(ddir)
    assert len(rows) == 3 * 5 * 2  # background noise is not a class
    assert not any("_background_noise_" in r["source"] for r in rows)
    val = set((src / "validation_list.txt").read_text().split())
    test = set((src / "testing_list.txt").read_text().split())
    for r in rows:
        expect = "test" if r["source"] in test else "val" if r["source"] in val else "train"
        assert r["split"] == expect
        assert r["speaker"] == Path(r["source"]).name.split("_nohash_")[0]
        assert r["label_name"] == r["source"].split("/")[0]
    names = json.loads((ddir / "prepared.json").read_text())["classes"]
    assert len(names) == 35 and names[r["label"]] == r["label_name"]
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_librispeech_speakers(tmp_path):
    make_librispeech(tmp_path / "src")
    ddir = prepare("librispeech", tmp_path / "src", tmp_path / "root", progress=False)
    rows = manifest(ddir)
    assert len(rows) == 3 * 2 * 4
    assert json.loads((ddir / "prepared.json").read_text())["classes"] == ["19", "26", "103"]
    for r in rows:
        assert r["speaker"] == r["label_name"] == r["clip_id"].split("-")[0]
        assert r["source"].startswith("train-clean-100/") and r["source"].endswith(".flac")


def test_librispeech_subset_train_clean_360(tmp_path):
    """--subset picks the subset (default train-clean-100); prepared.json records it and open_task refuses
    data of another subset than the catalog's options.subset, naming the prepare command."""
    from helix_sweep.data.__main__ import main as data_main

    src = make_librispeech(tmp_path / "src", chapters=1, utterances=3,
                           subsets={"train-clean-100": (19, 26), "train-clean-360": (103, 200, 311)})
    assert data_main(["prepare", "librispeech", "--subset", "train-clean-360", "--source", str(src),
                      "--root", str(tmp_path / "root")]) == 0
    ddir = tmp_path / "root" / "librispeech"
    done = json.loads((ddir / "prepared.json").read_text())
    assert done["subset"] == "train-clean-360" and done["classes"] == ["103", "200", "311"]
    rows = manifest(ddir)
    assert len(rows) == 3 * 3 and all(r["source"].startswith("train-clean-360/") for r in rows)
    task = open_task(tmp_path / "root", "librispeech", clip_seconds=1.0, subset="train-clean-360")
    assert task.num_classes == 3
    with pytest.raises(DatasetNotPrepared, match="holds train-clean-360, the task asks for subset train-clean-100.*"
                                                 "--subset train-clean-100"):
        open_task(tmp_path / "root", "librispeech", clip_seconds=1.0)  # the catalog's default subset
    with pytest.raises(DatasetNotPrepared, match="--subset train-clean-100"):  # the driver's check, before trials
        require_prepared(tmp_path / "root", "librispeech")
    assert require_prepared(tmp_path / "root", "librispeech", "train-clean-360") == ddir
    # the default subset rebuilds the same folder (another fingerprint); an unknown one is refused
    default = prepare("librispeech", src, tmp_path / "root", progress=False)
    assert json.loads((default / "prepared.json").read_text())["classes"] == ["19", "26"]
    with pytest.raises(PrepareError, match="subset='train-other-500'; valid: one of train-clean-100, train-clean-360"):
        prepare("librispeech", src, tmp_path / "root", subset="train-other-500", progress=False)
    with pytest.raises(PrepareError, match="none"):
        prepare("esc50", src, tmp_path / "root", subset="train-clean-360", progress=False)


def test_subsets_agree_with_the_catalog():
    """Every subset prepare can read has the catalog's speaker count (search_spaces/datasets.yaml)."""
    from helix_sweep.config import dataset_catalog
    from helix_sweep.data.layouts import REAL_DATASETS

    entry = dataset_catalog()["librispeech"]
    assert list(entry.subsets) == list(REAL_DATASETS["librispeech"].subsets)
    assert {k: v["num_classes"] for k, v in entry.subsets.items()} == {"train-clean-100": 251, "train-clean-360": 921}
    assert entry.options["subset"] == REAL_DATASETS["librispeech"].default_subset == "train-clean-100"
    assert REAL_DATASETS["librispeech"].official("train-clean-360")[0].endswith("/train-clean-360.tar.gz")


def test_voxpopuli_speakers_and_rows_without_speaker(tmp_path):
    make_voxpopuli(tmp_path / "src")
    ddir = prepare("voxpopuli", tmp_path / "src", tmp_path / "root", progress=False)
    rows = manifest(ddir)
    assert len(rows) == 15
    assert {r["speaker"] for r in rows} == {"4351", "96", "28176"}
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    excluded = [e for e in report(ddir)["entries"] if e["action"] == "excluded"]
    assert len(excluded) == 3 and all("no speaker id" in e["reason"] for e in excluded)


def test_finished_prepare_is_skipped_and_changed_source_rebuilds(tmp_path, caplog):
    src = make_esc50(tmp_path / "src", targets=(0,), folds=(1, 2))
    ddir = prepare("esc50", src, tmp_path / "root", progress=False)
    shard = ddir / "shards" / "shard-00000.arrow"
    before = shard.stat().st_mtime_ns
    caplog.set_level("INFO")
    prepare("esc50", src, tmp_path / "root", progress=False)
    assert shard.stat().st_mtime_ns == before
    assert "already prepared" in caplog.text
    # change one source file: detected, rebuilt, new content in the shards
    changed = src / "audio" / "2-100020-A-0.wav"
    write_audio(changed, 2.0, 44100, seed=999)
    set_mtime_later(changed)
    prepare("esc50", src, tmp_path / "root", progress=False)
    assert "changed since the last prepare" in caplog.text
    rows = manifest(ddir)
    i = [r["source"] for r in rows].index("audio/2-100020-A-0.wav")
    assert rows[i]["num_samples"] == 32000
    np.testing.assert_array_equal(store(ddir).clip(i), decode_file(changed).pcm)


def test_interrupted_prepare_resumes_finished_shards(tmp_path):
    """What a kill leaves (finished shards, no manifest or marker) is resumed, not redone."""
    src = make_esc50(tmp_path / "src")
    ddir = prepare("esc50", src, tmp_path / "root", shard_clips=3, progress=False)
    reference = manifest(ddir)
    shards = sorted((ddir / "shards").glob("shard-*.arrow"))
    assert len(shards) == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    for p in (ddir / "prepared.json", ddir / "manifest.parquet", ddir / "shards" / "shard-00003.json", shards[3]):
        p.unlink()
    (ddir / "shards" / "shard-00002.arrow.tmp").write_bytes(b"half written")
    prepare("esc50", src, tmp_path / "root", shard_clips=3, progress=False)
    assert manifest(ddir) == reference
    for p in shards[:3]:
        assert p.stat().st_mtime_ns == stamps[p.name]
    assert shards[3].is_file()


def test_killed_prepare_process_resumes(tmp_path):
    src = make_esc50(tmp_path / "src", targets=(0, 1, 2, 3), folds=(1, 2, 3, 4, 5))
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "helix_sweep.data", "prepare", "esc50", "--source", str(src), "--root", str(root), "--shard-clips", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = root / "esc50" / "shards" / "shard-00000.json"
    deadline = time.time() + 60
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "esc50" / "prepared.json").exists(), "the kill should land mid-prepare"
    # a shard is finished once its .json record exists; an .arrow without one was cut off and is rewritten
    done_before = {p.with_suffix(".arrow").name: p.with_suffix(".arrow").stat().st_mtime_ns
                   for p in (root / "esc50" / "shards").glob("shard-*.json")}
    assert done_before
    ddir = prepare("esc50", src, root, shard_clips=1, progress=False)
    assert len(manifest(ddir)) == 20
    for name, stamp in done_before.items():
        assert (ddir / "shards" / name).stat().st_mtime_ns == stamp
    st = store(ddir)
    for i, r in enumerate(manifest(ddir)):
        np.testing.assert_array_equal(st.clip(i), decode_file(src / r["source"]).pcm)


def test_parallel_workers_give_the_same_result(tmp_path):
    src = make_urbansound8k(tmp_path / "src", class_ids=(1, 2), folds=range(1, 5))
    one = prepare("urbansound8k", src, tmp_path / "one", shard_clips=3, progress=False)
    two = prepare("urbansound8k", src, tmp_path / "two", shard_clips=3, workers=2, progress=False)
    assert manifest(one) == manifest(two)
    for shard in (one / "shards").glob("*.arrow"):
        assert shard.read_bytes() == (two / "shards" / shard.name).read_bytes()


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_source(tmp_path, suffix):
    src = make_esc50(tmp_path / "src", targets=(5,), folds=(1, 3))
    archive = make_archive(src, tmp_path / f"ESC-50-master{suffix}")
    ddir = prepare("esc50", archive, tmp_path / "root", progress=False)
    assert [r["label_name"] for r in manifest(ddir)] == ["cat", "cat"]
    assert (ddir / "source" / "ESC-50-master" / "meta" / "esc50.csv").is_file()


# ---- bad input: each either raises naming the file and reason, or with on_error=skip is reported


def _edit_esc50_csv(src, row, **changes):
    meta = src / "meta" / "esc50.csv"
    lines = meta.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[row].split(",")
    for key, value in changes.items():
        cells[header.index(key)] = str(value)
    lines[row] = ",".join(cells)
    meta.write_text("\n".join(lines) + "\n")
    return cells[0]


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"filename": "1-999999-A-0.wav"}, "names a missing file"),
        ({"target": 57}, "outside the class list"),
        ({"fold": 7}, "fold 7 out of range 1..5"),
        ({"category": "unicorn"}, "does not match"),
    ],
)
def test_bad_metadata_rows(tmp_path, change, reason):
    src = make_esc50(tmp_path / "src", folds=(1, 2))
    name = _edit_esc50_csv(src, 2, **change)
    with pytest.raises(PrepareError, match=reason) as err:
        prepare("esc50", src, tmp_path / "root", progress=False)
    assert "esc50.csv line 3" in str(err.value)
    ddir = prepare("esc50", src, tmp_path / "root", on_error="skip", progress=False)
    assert len(manifest(ddir)) == 3
    [entry] = report(ddir)["entries"]
    assert entry["action"] == "skipped" and reason in entry["reason"] and "line 3" in entry["source"]
    assert name in entry["source"] or "999999" in entry["source"]


@pytest.mark.parametrize("kind,reason", [("corrupt", "unreadable"), ("empty", "unreadable"), ("truncated", "truncated")])
def test_bad_audio_files(tmp_path, kind, reason):
    src = make_esc50(tmp_path / "src", folds=(1, 2))
    bad = src / "audio" / "2-100020-A-0.wav"
    data = bad.read_bytes()
    bad.write_bytes({"corrupt": b"RIFF" + bytes(1000), "empty": b"", "truncated": data[: len(data) // 3]}[kind])
    with pytest.raises(PrepareError, match=f"audio/2-100020-A-0.wav: {reason}"):
        prepare("esc50", src, tmp_path / "root", progress=False)
    ddir = prepare("esc50", src, tmp_path / "root", on_error="skip", progress=False)
    assert "audio/2-100020-A-0.wav" not in [r["source"] for r in manifest(ddir)]
    assert len(manifest(ddir)) == 3
    [entry] = report(ddir)["entries"]
    assert entry == {"source": "audio/2-100020-A-0.wav", "action": "skipped", "reason": entry["reason"]}
    assert entry["reason"].startswith(reason)


def test_long_and_short_clips_are_reported(tmp_path):
    src = make_esc50(tmp_path / "src", targets=(0,), folds=(1, 2, 3))
    write_audio(src / "audio" / "1-100010-A-0.wav", 5.5, 44100, seed=1)
    write_audio(src / "audio" / "2-100020-A-0.wav", 3.0, 44100, seed=2)
    ddir = prepare("esc50", src, tmp_path / "root", progress=False)
    actions = {e["source"]: e["action"] for e in report(ddir)["entries"]}
    assert actions == {"audio/1-100010-A-0.wav": "cropped", "audio/2-100020-A-0.wav": "padded"}


def test_unknown_word_folder_and_missing_list_entry(tmp_path):
    src = make_speechcommands(tmp_path / "src", words=("yes",))
    write_audio(src / "banana" / "0a1b2c3d_nohash_0.wav", 1.0, 16000, seed=1)
    with pytest.raises(PrepareError, match="banana.*outside the 35-word class list"):
        prepare("speechcommands", src, tmp_path / "root", progress=False)
    (src / "testing_list.txt").write_text((src / "testing_list.txt").read_text() + "yes/gone_nohash_0.wav\n")
    ddir = prepare("speechcommands", src, tmp_path / "root", on_error="skip", progress=False)
    reasons = sorted(e["reason"] for e in report(ddir)["entries"] if e["action"] == "skipped")
    assert len(reasons) == 2
    assert "outside the 35-word class list" in reasons[0]
    assert "names a missing file" in reasons[1] and "yes/gone_nohash_0.wav" in reasons[1]


def test_librispeech_unknown_speaker_and_missing_utterance(tmp_path):
    src = make_librispeech(tmp_path / "src", speakers=(19, 26))
    write_audio(src / "train-clean-100" / "555" / "1" / "555-1-0000.flac", 1.0, 16000, seed=1, fmt="FLAC")
    with pytest.raises(PrepareError, match="speaker 555 outside the class list"):
        prepare("librispeech", src, tmp_path / "root", progress=False)
    (src / "train-clean-100" / "19" / "1900" / "19-1900-0001.flac").unlink()
    ddir = prepare("librispeech", src, tmp_path / "root", on_error="skip", progress=False)
    reasons = " | ".join(e["reason"] for e in report(ddir)["entries"])
    assert "speaker 555" in reasons and "names a missing file" in reasons
    assert len(manifest(ddir)) == 2 * 2 * 4 - 1


def test_not_a_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no meta/esc50.csv found"):
        prepare("esc50", tmp_path / "empty", tmp_path / "root", progress=False)
    with pytest.raises(PrepareError, match="not a directory, a zip/tar archive"):
        prepare("esc50", tmp_path / "nothing-here", tmp_path / "root", progress=False)


def test_cli_prepare_and_error_exit(tmp_path):
    src = make_esc50(tmp_path / "src", targets=(0,), folds=(1,))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "helix_sweep.data", "prepare", "esc50", "--source", str(src), "--root", str(tmp_path / "root")],
                        cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "1 clips, 50 classes" in ok.stdout
    _edit_esc50_csv(src, 1, fold=9)
    bad = subprocess.run([sys.executable, "-m", "helix_sweep.data", "prepare", "esc50", "--source", str(src), "--root", str(tmp_path / "r2")],
                         cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "fold 9 out of range 1..5" in bad.stderr and "esc50.csv line 2" in bad.stderr
