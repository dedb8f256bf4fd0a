"""Arrow IPC shards of clips, written once and read memory-mapped.

A shard is one Arrow IPC file holding one record batch with columns
  clip_id: string, audio: large_list<int16>  (mono 16 kHz PCM, clip at its native length).
`ClipStore` maps every shard of a prepared dataset and hands out zero-copy int16 views, so reading a
clip is a slice of the page cache: no decoding, no resampling, and random access costs the same as
sequential access once the pages are warm.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

_SCALE = np.float32(1.0 / 32768.0)  # int16 full scale -> 1.0

SCHEMA = pa.schema(
    [("clip_id", pa.string()), ("audio", pa.large_list(pa.int16()))],
    metadata={"sample_rate": "16000", "format": "pcm16"},
)


def write_shard(path: Path, clip_ids: Sequence[str], clips: Sequence[np.ndarray]) -> None:
    """Write one shard atomically (temp file + rename), so a killed writer leaves no half shard."""
    lengths = np.array([len(c) for c in clips], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate(clips).astype(np.int16) if clips else np.zeros(0, np.int16)
    audio = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    batch = pa.record_batch([pa.array(list(clip_ids), pa.string()), audio], schema=SCHEMA)
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_batch(batch)
    os.replace(tmp, path)


class ClipStore:
    """All clips of a prepared dataset, memory-mapped. Row i is manifest row i.

    `shard_of[i]`, `start[i]` and `length[i]` locate clip i inside `values[shard_of[i]]` (an int16
    view over the mapped file). Pickles as paths only and maps again lazily on the other side.
    """

    def __init__(self, shard_paths: Sequence[Path], shard: np.ndarray, row: np.ndarray):
        self.shard_paths = [Path(p) for p in shard_paths]
        self._shard = np.asarray(shard, dtype=np.int64)
        self._row = np.asarray(row, dtype=np.int64)
        self._mapped = None

    def __len__(self) -> int:
        return len(self._shard)

    def __getstate__(self):
        return {"shard_paths": self.shard_paths, "_shard": self._shard, "_row": self._row, "_mapped": None}

    def _map(self):
        values, shard_starts, shard_lengths, keep = [], [], [], []
        for path in self.shard_paths:
            source = pa.memory_map(str(path), "r")
            batch = pa.ipc.open_file(source).get_batch(0)
            audio = batch.column(1)
            offsets = audio.offsets.to_numpy()
            values.append(audio.values.to_numpy(zero_copy_only=True))
            shard_starts.append(offsets[:-1])
            shard_lengths.append(np.diff(offsets))
            keep.append(source)
        start = np.array([shard_starts[s][r] for s, r in zip(self._shard, self._row)], dtype=np.int64)
        length = np.array([shard_lengths[s][r] for s, r in zip(self._shard, self._row)], dtype=np.int64)
        self._mapped = (values, start, length, keep)
        return self._mapped

    @property
    def lengths(self) -> np.ndarray:
        """(N,) samples of each clip at 16 kHz."""
        return (self._mapped or self._map())[2]

    def clip(self, i: int) -> np.ndarray:
        """Clip i as a read-only int16 view (no copy)."""
        values, start, length, _ = self._mapped or self._map()
        s = start[i]
        return values[self._shard[i]][s : s + length[i]]

    def assemble(
        self,
        out: np.ndarray,
        b: int,
        clips: np.ndarray,
        starts: np.ndarray,
        stops: np.ndarray,
        dests: np.ndarray,
    ) -> None:
        """Write segments [starts, stops) of `clips`, scaled to float in [-1, 1), into row b of float32
        `out` at offsets `dests` (one pass: int16 -> float32 and scaling together)."""
        values, start, _, _ = self._mapped or self._map()
        for c, a, z, d in zip(clips, starts, stops, dests):
            s = start[c]
            np.multiply(values[self._shard[c]][s + a : s + z], _SCALE, out=out[b, d : d + (z - a)])
