"""Data-path benchmark: clips/s delivered to the training loop, Arrow shards vs decoding each file.

Builds an ESC-50-layout source of 5 s, 44.1 kHz, 16-bit WAV clips, prepares it, then times, in one
process on one thread, over the same clips in the same random order and batch size:
  arrow:    task.get_batch(indices) from the memory-mapped shards (what training does)
  per-item: soundfile decode + soxr resample to 16 kHz + pad/crop per clip (what it would do otherwise)
The figures go to benchmarks/RESULTS.md under "## data" (replacing that section only).

    python benchmarks/data.py [--clips 200] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from helix_sweep.data import open_task
from helix_sweep.data.audio import decode_float, fit_length
from helix_sweep.data.layouts import ESC50_CLASSES
from helix_sweep.data.prepare import prepare

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def make_source(base: Path, clips: int) -> Path:
    """ESC-50-master layout with `clips` 5 s 44.1 kHz mono 16-bit clips, spread over 5 folds."""
    src = base / "ESC-50-master"
    (src / "audio").mkdir(parents=True)
    (src / "meta").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    t = np.arange(5 * 44100) / 44100
    for i in range(clips):
        fold, target = i % 5 + 1, (i // 5) % 50
        name = f"{fold}-{1000 + i}-A-{target}.wav"
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(str(src / "audio" / name), x.astype(np.float32), 44100, subtype="PCM_16")
        rows.append([name, fold, target, ESC50_CLASSES[target], False, 1000 + i, "A"])
    with open(src / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        w.writerows(rows)
    return src


def time_passes(fn, batches, repeats: int) -> float:
    """Best clips/s over `repeats` passes through all batches."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = 0
        for b in batches:
            x, _ = fn(b)
            n += x.shape[0]
        best = max(best, n / (time.perf_counter() - start))
    return best


def write_section(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = "## data\n\n" + text.strip() + "\n"
    pattern = re.compile(r"^## data\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(section + "\n", old) if pattern.search(old) else old.rstrip() + "\n\n" + section
    RESULTS.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_source(tmp / "src", args.clips)
        t0 = time.perf_counter()
        prepare("esc50", src, tmp / "root", workers=1, progress=False)
        prepare_s = time.perf_counter() - t0
        task = open_task(tmp / "root", "esc50", fold=1)
        clipset = task.train  # 4/5 of the clips
        paths = [src / "audio" / f"{cid}.wav" for cid in clipset.clip_ids]
        order = np.random.default_rng(0).permutation(len(clipset))
        batches = [order[i : i + args.batch] for i in range(0, len(order), args.batch)]

        def per_item(indices):
            x = np.stack([fit_length(decode_float(paths[i]), task.clip_samples) for i in indices])
            return torch.from_numpy(x), torch.from_numpy(clipset.labels[indices])

        # same clips, same values (up to the int16 storage step)
        a, _ = clipset.get_batch(batches[0])
        b, _ = per_item(batches[0])
        max_diff = (a - b).abs().max().item()
        assert max_diff <= 1.0 / 32768 + 1e-6, max_diff
        arrow = time_passes(clipset.get_batch, batches, args.repeats)
        item = time_passes(per_item, batches, args.repeats)
    ratio = arrow / item
    text = f"""
`python benchmarks/data.py --clips {args.clips} --batch {args.batch} --repeats {args.repeats}` ({time.strftime('%Y-%m-%d')},
{platform.processor() or platform.machine()}, one thread, shared 2-core machine, warm page cache). {len(order)} ESC-50-layout
clips of 5 s, 44.1 kHz 16-bit WAV, random order, batches of {args.batch}, best of {args.repeats} passes:

| path | 5 s clips/s (one core) |
|---|---|
| Arrow shards, memory-mapped (`ClipSet.get_batch`) | {arrow:,.0f} |
| decode (soundfile) + resample (soxr HQ) + pad per item | {item:,.0f} |

Speed-up {ratio:.0f}x (target >= 20x). One core sustains about {item:,.0f} clips/s of 5 s audio by decoding
(that is also prepare's rate per worker: this run prepared {args.clips} clips in {prepare_s:.1f} s), and
about {arrow:,.0f} clips/s from the shards. Largest difference between the two paths' samples: {max_diff:.1e}
(the int16 storage step is 3.1e-05).
"""
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
