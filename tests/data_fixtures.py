"""Builders of small datasets in the exact on-disk layouts of the real ones, plus a local HTTP server.

Reusable by any test: each builder writes real audio files with soundfile under a given folder and
returns the dataset's source directory. Audio content is a seeded tone + noise so that decoded clips can
be compared with the originals.
"""

from __future__ import annotations

import csv
import http.server
import os
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf


def tone(seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    """(frames,) or (frames, channels) float32 in [-0.5, 0.5]: a seeded sine plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 1000) * t) + 0.05 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    return x if channels == 1 else np.stack([x * (1 - 0.2 * c) for c in range(channels)], axis=1)


def write_audio(path: Path, seconds: float, rate: int, seed: int, subtype: str = "PCM_16", channels: int = 1, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, rate, seed, channels), rate, subtype=subtype, format=fmt)
    return path


def make_esc50(root: Path, targets=(0, 1), folds=(1, 2, 3, 4, 5), seconds: float = 5.0) -> Path:
    """ESC-50-master/meta/esc50.csv + audio/{fold}-{clip}-{take}-{target}.wav, 44.1 kHz mono 16-bit."""
    from helix_sweep.data.layouts import ESC50_CLASSES

    base = Path(root) / "ESC-50-master"
    rows = []
    for fold in folds:
        for target in targets:
            src = 100000 + 10 * fold + target
            name = f"{fold}-{src}-A-{target}.wav"
            write_audio(base / "audio" / name, seconds, 44100, seed=src)
            rows.append([name, fold, target, ESC50_CLASSES[target], target in (0, 1), src, "A"])
    (base / "meta").mkdir(parents=True, exist_ok=True)
    with open(base / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        w.writerows(rows)
    return base


# (sample rate, subtype, channels): the variety UrbanSound8K really has
US8K_FORMATS = [
    (44100, "PCM_16", 2),
    (22050, "PCM_U8", 1),
    (48000, "PCM_24", 1),
    (16000, "FLOAT", 2),
    (96000, "PCM_24", 2),
    (11025, "PCM_16", 1),
    (44100, "FLOAT", 1),
    (8000, "PCM_U8", 2),
    (32000, "PCM_32", 1),
    (22050, "PCM_16", 2),
]


def make_urbansound8k(root: Path, class_ids=(0, 3, 8), folds=range(1, 11)) -> Path:
    """UrbanSound8K/metadata/UrbanSound8K.csv + audio/fold<k>/<fsID>-<class>-0-<n>.wav, mixed formats."""
    from helix_sweep.data.layouts import URBANSOUND8K_CLASSES

    base = Path(root) / "UrbanSound8K"
    rows = []
    for fold in folds:
        for j, cid in enumerate(class_ids):
            k = len(rows)
            rate, subtype, channels = US8K_FORMATS[k % len(US8K_FORMATS)]
            seconds = [4.0, 1.5, 2.75, 0.5][k % 4]
            fs_id = 5000 + k
            name = f"{fs_id}-{cid}-0-{fold}.wav"
            write_audio(base / "audio" / f"fold{fold}" / name, seconds, rate, seed=fs_id, subtype=subtype, channels=channels)
            rows.append([name, fs_id, 0.0, seconds, 1, fold, cid, URBANSOUND8K_CLASSES[cid]])
    (base / "metadata").mkdir(parents=True, exist_ok=True)
    with open(base / "metadata" / "UrbanSound8K.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"])
        w.writerows(rows)
    return base


def make_speechcommands(root: Path, words=("yes", "no", "up"), speakers=("0a1b2c3d", "1f2e3d4c", "9a8b7c6d", "deadbeef", "c0ffee00"), takes=2) -> Path:
    """<word>/<speaker>_nohash_<n>.wav (16 kHz, up to 1 s), validation_list.txt, testing_list.txt,
    and a _background_noise_/ folder that is not a class. Speaker 0 -> test, speaker 1 -> val."""
    base = Path(root) / "speech_commands_v0.02"
    val, test = [], []
    for w, word in enumerate(words):
        for s, spk in enumerate(speakers):
            for n in range(takes):
                rel = f"{word}/{spk}_nohash_{n}.wav"
                seconds = 1.0 if (s + n) % 3 else 0.75  # some clips are shorter than 1 s, as in the real set
                write_audio(base / rel, seconds, 16000, seed=1000 * w + 10 * s + n)
                (test if s == 0 else val if s == 1 else []).append(rel)
    write_audio(base / "_background_noise_" / "white_noise.wav", 3.0, 16000, seed=7)
    (base / "validation_list.txt").write_text("\n".join(val) + "\n")
    (base / "testing_list.txt").write_text("\n".join(test) + "\n")
    return base


def make_librispeech(root: Path, speakers=(19, 26, 103), chapters=2, utterances=4, seconds=(1.0, 2.5),
                     subsets: dict[str, tuple] | None = None) -> Path:
    """LibriSpeech/SPEAKERS.TXT + <subset>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac + .trans.txt, as the
    official archives unpack (several subsets share LibriSpeech/); subsets: {subset: speakers}, default
    {"train-clean-100": speakers}."""
    base = Path(root) / "LibriSpeech"
    lines = [
        "; Some comments",
        ";ID  |SEX| SUBSET           |MINUTES| NAME",
    ]
    rng = np.random.default_rng(0)
    for subset, spk in ((sub, s) for sub, spks in (subsets or {"train-clean-100": speakers}).items() for s in spks):
        lines.append(f"{spk:<5}| F | {subset:<16} | 25.19 | Reader {spk}")
        for c in range(chapters):
            chapter = 100 * spk + c
            d = base / subset / str(spk) / str(chapter)
            trans = []
            for u in range(utterances):
                utt = f"{spk}-{chapter}-{u:04d}"
                write_audio(d / f"{utt}.flac", float(rng.uniform(*seconds)), 16000, seed=zlib.crc32(utt.encode()), fmt="FLAC")
                trans.append(f"{utt} SOME WORDS OF {spk}")
            (d / f"{spk}-{chapter}.trans.txt").write_text("\n".join(trans) + "\n")
    lines.append("9999 | M | train-other-500 | 30.00 | Someone Else")
    base.mkdir(parents=True, exist_ok=True)
    (base / "SPEAKERS.TXT").write_text("\n".join(lines) + "\n")
    return base


def make_voxpopuli(root: Path, speakers=("4351", "96", "28176"), per_speaker=5, seconds=(1.0, 3.0)) -> Path:
    """voxpopuli/transcribed_data/en/<year>/<id>.ogg + asr_{train,dev,test}.tsv (8 columns).
    One extra row per split has speaker_id None (the real data has such rows)."""
    base = Path(root) / "voxpopuli"
    en = base / "transcribed_data" / "en"
    header = ["id", "raw_text", "normalized_text", "speaker_id", "split", "gender", "is_gold_transcript", "accent"]
    rows = {"train": [], "dev": [], "test": []}
    rng = np.random.default_rng(1)
    k = 0
    for spk in speakers:
        for u in range(per_speaker):
            year = 2009 + k % 3
            uid = f"{year}0114-0900-PLENARY-{k}-en_{year}0114-18:01:{k:02d}_{u}"
            split = ("train", "train", "train", "dev", "test")[u % 5]
            write_audio(en / str(year) / f"{uid}.ogg", float(rng.uniform(*seconds)), 16000, seed=k, fmt="OGG", subtype="VORBIS")
            rows[split].append([uid, "Raw text.", "raw text", spk, split, "female", "True", "None"])
            k += 1
    for split in rows:
        uid = f"20100101-0900-PLENARY-99-en_20100101-00:00:00_{split}"
        write_audio(en / "2010" / f"{uid}.ogg", 1.0, 16000, seed=99, fmt="OGG", subtype="VORBIS")
        rows[split].append([uid, "x", "x", "None", split, "None", "True", "None"])
        with open(en / f"asr_{split}.tsv", "w", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(header)
            w.writerows(rows[split])
    return base


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support; can cut the first responses short to simulate a drop."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        server = self.server
        server.requests.append({"path": self.path, "range": self.headers.get("Range")})
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and server.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if server.cut_after is not None and server.cuts_left > 0:
            server.cuts_left -= 1
            self.wfile.write(body[: server.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@contextmanager
def range_server(directory: Path, cut_after: int | None = None, cuts: int = 1, honour_range: bool = True):
    """Serve `directory` on 127.0.0.1 (a free port); yields (base_url, server). The first `cuts`
    responses stop after `cut_after` bytes of body. server.requests records path and Range header."""

    def handler(*args, **kwargs):
        return _RangeHandler(*args, directory=str(directory), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests, server.cut_after, server.cuts_left, server.honour_range = [], cut_after, cuts, honour_range
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


def make_archive(src: Path, dest: Path) -> Path:
    """Pack `src` (a folder) into dest (.zip or .tar.gz) with `src.name` as the top folder."""
    import shutil

    fmt = "zip" if dest.name.endswith(".zip") else "gztar"
    base = str(dest).removesuffix(".zip").removesuffix(".tar.gz")
    return Path(shutil.make_archive(base, fmt, root_dir=src.parent, base_dir=src.name))


def set_mtime_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
