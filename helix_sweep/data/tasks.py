"""Tasks: a prepared dataset turned into train / val / test example sets for one trial (one concept:
the constructions below share the Examples form, so they stay in one module).

An example is a list of segments (clip, start, stop, dest): samples [start, stop) of a stored clip
copied to offset `dest` of a zero buffer of `clip_samples`. One shape covers every construction:
- folds / splits: one segment per example, the clip cropped at the end or zero-padded to clip_samples.
- concat (Speech Commands): example j of a split joins that split's clip j (its label is the example's
  label) and n-1 clips drawn with replacement from the same split, each padded/cropped to clip_seconds.
- speaker: per speaker, utterances are shuffled (seeded) and split train_share / rest (at least one
  utterance each side), val_fraction of the train side goes to val; each side is put back in clip_id
  order, joined into one stream and cut into consecutive windows of clip_samples. The last, partial
  window is zero-padded (partial_clip="pad", the default: no speech is lost and every speaker with
  audio on a side has a clip there) or dropped (partial_clip="drop"; speakers left without a clip on
  a side are listed in task.info["speakers_missing"]).
The construction (seed, options, counts and a digest of the composition) is written to
`<root>/<dataset>/tasks/<key>.json` and returned in task.info.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from helix_sweep.config import dataset_catalog

from .audio import SAMPLE_RATE
from .layouts import REAL_DATASETS
from .prepare import is_prepared, prepare_command
from .shards import ClipStore

log = logging.getLogger(__name__)


class DatasetNotPrepared(Exception):
    """A real dataset missing or half-prepared under the data root; the message gives the prepare command."""


@dataclass(frozen=True)
class TaskSpec:
    """How a dataset's task is built: the data layer's part (_TASKS) joined with the catalog's."""

    base: str  # the prepared (or generated) dataset folder the task reads
    kind: str  # folds | splits | concat | speaker
    clip_seconds: float  # default pad/crop length (per joined clip for concat, stitch length for speaker)
    folds: int | None = None
    options: dict = field(default_factory=dict)  # kind-specific option defaults


# The data layer's own part of each dataset: the prepared (or generated) folder it reads and how its
# examples are built. Clip length, folds, concat_n, an explicit pool_tokens and the source subset are the
# catalog's (search_spaces/datasets.yaml): a concat task's clips are clip_seconds / concat_n long each
# (its info records the first clip's samples; the head's K per frontend is the grid's, from the frontend).
# Synthetic tasks are sized there for the CPU smoke grid: 0.5 s commands, 2 x 0.5 s concat (K = 50 raw
# tokens = the first clip), 1 s speaker windows (pure attention on raw tokens did not learn 1.5-2 s
# windows of 260-450 clips in 6 epochs; it did at 1 s).
_TASKS = {
    "esc50": ("esc50", "folds"),
    "urbansound8k": ("urbansound8k", "folds"),
    "speechcommands": ("speechcommands", "splits"),
    "speechcommands-concat": ("speechcommands", "concat"),
    "librispeech": ("librispeech", "speaker"),
    "voxpopuli": ("voxpopuli", "speaker"),
    "synth-textures": ("synth-textures", "folds"),
    "synth-commands": ("synth-commands", "splits"),
    "synth-concat": ("synth-commands", "concat"),
    "synth-speaker": ("synth-speaker", "speaker"),
}
SPEAKER_OPTIONS = {"train_share": 0.8, "partial_clip": "pad"}  # defaults of the speaker construction
DATASETS = tuple(_TASKS)
SYNTHETIC_BASES = ("synth-textures", "synth-commands", "synth-speaker")


def task_spec(dataset: str) -> TaskSpec:
    if dataset not in _TASKS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    base, kind = _TASKS[dataset]
    entry = dataset_catalog().get(dataset)
    if entry is None:
        raise ValueError(f"dataset {dataset!r} is missing from search_spaces/datasets.yaml")
    clip_seconds, options = entry.clip_seconds, {}
    if kind == "concat":
        n = int(entry.options.get("concat_n", 0))
        if n < 1:
            raise ValueError(f"search_spaces/datasets.yaml: {dataset} needs options.concat_n >= 1 (got {entry.options})")
        clip_seconds, options = clip_seconds / n, {"concat_n": n, "pool_tokens": entry.pool_tokens}
    elif kind == "speaker":
        options = dict(SPEAKER_OPTIONS)
    if entry.subsets:  # a source with subsets (LibriSpeech): the one prepared must be the one named
        options["subset"] = entry.options.get("subset", next(iter(entry.subsets)))
    folds = len(entry.folds) if entry.folds else None
    return TaskSpec(base, kind, clip_seconds, folds=folds, options=options)


@dataclass
class Examples:
    """Examples of one split as segments in CSR form: example e owns segments ptr[e]:ptr[e+1]."""

    labels: np.ndarray  # (E,) int64
    ptr: np.ndarray  # (E+1,)
    clip: np.ndarray  # (S,) manifest row
    start: np.ndarray  # (S,) first sample in the clip
    stop: np.ndarray  # (S,) one past the last sample in the clip
    dest: np.ndarray  # (S,) offset in the example

    @classmethod
    def from_lists(cls, labels: list[int], segments: list[list[tuple[int, int, int, int]]]) -> "Examples":
        flat = [s for segs in segments for s in segs]
        arr = np.array(flat, dtype=np.int64).reshape(-1, 4)
        ptr = np.concatenate([[0], np.cumsum([len(s) for s in segments])]).astype(np.int64)
        return cls(np.asarray(labels, dtype=np.int64), ptr, arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.labels, self.ptr, self.clip, self.start, self.stop, self.dest):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


class ClipSet:
    """One split of a task: examples of exactly clip_samples samples at 16 kHz, read from mapped shards."""

    def __init__(self, store: ClipStore, examples: Examples, clip_samples: int, clip_ids: np.ndarray, name: str):
        self.store = store
        self.examples = examples
        self.clip_samples = clip_samples
        self.clip_ids = clip_ids  # (E,) clip_id of each example's first segment, for logging and debugging
        self.name = name

    def __len__(self) -> int:
        return len(self.examples.labels)

    def __repr__(self) -> str:
        return f"ClipSet({self.name!r}, n={len(self)}, clip_samples={self.clip_samples})"

    @property
    def labels(self) -> np.ndarray:
        return self.examples.labels

    def get_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples `indices` -> (float32 (B, clip_samples) in [-1, 1), int64 (B,)); int16 / 32768."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.name}: indices must lie in 0..{len(self) - 1}, got {idx.min()}..{idx.max()}")
        ex = self.examples
        out = np.zeros((len(idx), self.clip_samples), dtype=np.float32)  # (B, T)
        for b, e in enumerate(idx):
            p, q = ex.ptr[e], ex.ptr[e + 1]
            self.store.assemble(out, b, ex.clip[p:q], ex.start[p:q], ex.stop[p:q], ex.dest[p:q])
        return torch.from_numpy(out), torch.from_numpy(ex.labels[idx].copy())


@dataclass
class Task:
    dataset: str
    train: ClipSet
    test: ClipSet
    val: ClipSet | None
    num_classes: int
    label_names: list[str]
    clip_samples: int
    info: dict
    pool_tokens: int | None = None  # an explicit K (pool over the first K tokens) set for a concat task, else None
    first_clip_samples: int | None = None  # concat tasks: samples of the first (labelled) clip, else None
    sample_rate: int = SAMPLE_RATE


def _check_options(dataset: str, spec: TaskSpec, fold: int | None, options: dict) -> dict:
    allowed = {"val_fraction": 0.0, "clip_seconds": spec.clip_seconds, **spec.options}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{dataset}: unknown task option(s) {unknown}; allowed: {sorted(allowed)}")
    opts = {**allowed, **options}
    if spec.folds:
        if fold is None:
            raise ValueError(f"{dataset} has {spec.folds} folds: pass fold=1..{spec.folds} (the test fold)")
        if not isinstance(fold, (int, np.integer)) or not 1 <= fold <= spec.folds:
            raise ValueError(f"{dataset}: fold={fold!r} out of range; valid folds are 1..{spec.folds}")
    elif fold is not None:
        raise ValueError(f"{dataset} has no folds (single split); pass fold=None, got fold={fold!r}")
    if not 0.0 <= float(opts["val_fraction"]) < 1.0:
        raise ValueError(f"{dataset}: val_fraction must lie in [0, 1), got {opts['val_fraction']!r}")
    if spec.kind in ("splits", "concat") and opts["val_fraction"]:
        raise ValueError(f"{dataset} has an official validation split; val_fraction must be 0, got {opts['val_fraction']}")
    if float(opts["clip_seconds"]) <= 0:
        raise ValueError(f"{dataset}: clip_seconds must be positive, got {opts['clip_seconds']!r}")
    if spec.kind == "concat":
        if int(opts["concat_n"]) < 1 or (opts["pool_tokens"] is not None and int(opts["pool_tokens"]) < 1):
            raise ValueError(f"{dataset}: concat_n and pool_tokens must be >= 1 (pool_tokens may be None), "
                             f"got {opts['concat_n']}, {opts['pool_tokens']}")
    if "subset" in spec.options:
        valid = list(dataset_catalog()[dataset].subsets)
        if opts["subset"] not in valid:
            raise ValueError(f"{dataset}: subset={opts['subset']!r} not one of {valid}")
    if spec.kind == "speaker":
        if opts["partial_clip"] not in ("pad", "drop"):
            raise ValueError(f"{dataset}: partial_clip must be 'pad' or 'drop', got {opts['partial_clip']!r}")
        if not 0.0 < float(opts["train_share"]) < 1.0:
            raise ValueError(f"{dataset}: train_share must lie in (0, 1), got {opts['train_share']!r}")
    return opts


def _ensure_prepared(root: Path, dataset: str, spec: TaskSpec) -> Path:
    ddir = root / spec.base
    if spec.base in SYNTHETIC_BASES:
        from .synthetic import ensure_synthetic

        return ensure_synthetic(root, spec.base)
    if not is_prepared(ddir):
        state = "half-prepared (no finished prepare)" if ddir.exists() else "missing"
        raise DatasetNotPrepared(
            f"dataset {dataset!r} needs {spec.base!r} prepared under {root}, but {ddir} is {state}. "
            f"Run: {prepare_command(spec.base, root)}"
        )
    return ddir


def is_synthetic(dataset: str) -> bool:
    """Built here from nothing (generated on first use), not prepared from a real source."""
    return task_spec(dataset).base in SYNTHETIC_BASES


def require_prepared(data_root: str | Path, dataset: str, subset: str | None = None) -> Path:
    """Fail fast (before any trial starts) if `dataset` cannot be opened under `data_root`.

    Raises DatasetNotPrepared for a missing or half-prepared real dataset (naming the prepare command),
    or one prepared from another source subset than `subset` (default: the catalog's); generates a
    synthetic one if needed. Returns the prepared folder.
    """
    spec = task_spec(dataset)
    ddir = _ensure_prepared(Path(data_root), dataset, spec)
    if "subset" in spec.options:
        _check_subset(ddir, dataset, spec, subset or spec.options["subset"], Path(data_root))
    return ddir


def _check_subset(ddir: Path, dataset: str, spec: TaskSpec, subset: str, root: Path) -> None:
    """The prepared folder holds `subset` (data prepared before subsets were recorded: the default one)."""
    held = json.loads((ddir / "prepared.json").read_text()).get("subset", REAL_DATASETS[spec.base].default_subset)
    if held != subset:
        raise DatasetNotPrepared(f"dataset {dataset!r}: {ddir} holds {held}, the task asks for subset {subset}. "
                                 f"Run: {prepare_command(spec.base, root)} --subset {subset}")


def _single(rows: np.ndarray, labels: np.ndarray, lengths: np.ndarray, clip_samples: int) -> Examples:
    stop = np.minimum(lengths[rows], clip_samples)
    return Examples(labels[rows], np.arange(len(rows) + 1), rows, np.zeros_like(rows), stop, np.zeros_like(rows))


def _stratified_val(rows: np.ndarray, labels: np.ndarray, fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Move `fraction` of each class of `rows` to val (seeded); returns (train_rows, val_rows)."""
    val = []
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        val.extend(rng.permutation(members)[: int(round(fraction * len(members)))])
    val = np.sort(np.asarray(val, dtype=np.int64))
    return np.setdiff1d(rows, val), val


def _concat(rows: np.ndarray, labels, lengths, n: int, per: int, rng) -> Examples:
    if len(rows) == 0:
        return Examples.from_lists([], [])
    others = rng.choice(rows, size=(len(rows), n - 1), replace=True) if n > 1 else np.zeros((len(rows), 0), np.int64)
    segments = []
    for first, rest in zip(rows, others):
        segments.append([(c, 0, min(lengths[c], per), k * per) for k, c in enumerate([first, *rest])])
    return Examples.from_lists(labels[rows].tolist(), segments)


def _stitch(utts: list[int], lengths, label: int, clip_samples: int, keep_partial: bool):
    """Join utterances into one stream and cut it into windows of clip_samples; returns (labels, segments)."""
    bounds = np.concatenate([[0], np.cumsum(lengths[utts])]).astype(np.int64)
    total = int(bounds[-1])
    n_windows = total // clip_samples + (1 if keep_partial and total % clip_samples else 0)
    segments = []
    for w in range(n_windows):
        a, z = w * clip_samples, min((w + 1) * clip_samples, total)
        first = int(np.searchsorted(bounds, a, side="right")) - 1
        segs = []
        for u in range(first, len(utts)):
            s, e = max(a, bounds[u]), min(z, bounds[u + 1])
            if s >= z:
                break
            if e > s:
                segs.append((utts[u], int(s - bounds[u]), int(e - bounds[u]), int(s - a)))
        segments.append(segs)
    return [label] * len(segments), segments


def _speaker_split(man: dict, lengths, opts: dict, clip_samples: int, seed: int):
    keep_partial = opts["partial_clip"] == "pad"
    sides = {"train": ([], []), "val": ([], []), "test": ([], [])}
    missing = {"train": [], "val": [], "test": []}
    labels = man["label"]
    for label in np.unique(labels):
        utts = np.flatnonzero(labels == label)
        utts = utts[np.argsort(man["clip_id"][utts], kind="stable")]
        rng = np.random.default_rng([seed, int(label)])
        order = rng.permutation(utts)
        n_test = max(1, int(round((1 - opts["train_share"]) * len(utts)))) if len(utts) > 1 else 0
        test, train = order[:n_test], order[n_test:]
        n_val = int(round(opts["val_fraction"] * len(train))) if opts["val_fraction"] else 0
        val, train = train[:n_val], train[n_val:]
        for side, members in (("train", train), ("val", val), ("test", test)):
            ordered = sorted(members.tolist(), key=lambda r: man["clip_id"][r])
            labs, segs = _stitch(ordered, lengths, int(label), clip_samples, keep_partial) if ordered else ([], [])
            if not labs and (side != "val" or opts["val_fraction"]):
                missing[side].append(man["label_name"][utts[0]])
            sides[side][0].extend(labs)
            sides[side][1].extend(segs)
    for side, names in missing.items():
        if names:
            log.warning("speaker task: %d speaker(s) have no %s clip: %s", len(names), side, names[:10])
    built = {side: Examples.from_lists(*sides[side]) for side in sides}
    return built, {k: v for k, v in missing.items() if v}


def _write_sidecar(ddir: Path, key: str, record: dict) -> Path:
    """Record the construction; identical content from parallel trials makes the rename harmless."""
    path = ddir / "tasks" / f"{key}.json"
    path.parent.mkdir(exist_ok=True)
    text = json.dumps(record, indent=1, sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def open_task(data_root: str | Path, dataset: str, *, fold: int | None = None, seed: int = 0, **options) -> Task:
    """Build the task `dataset` (one of DATASETS) from the prepared data under `data_root`.

    fold: the test fold (1-based) for folded datasets, None otherwise. seed: drives every random choice
    of the construction (val split, concat draws, speaker split); folds are never reshuffled.
    options: val_fraction, clip_seconds, and per kind concat_n / pool_tokens or train_share / partial_clip.
    """
    spec = task_spec(dataset)
    opts = _check_options(dataset, spec, fold, options)
    root = Path(data_root)
    ddir = _ensure_prepared(root, dataset, spec)
    prepared = json.loads((ddir / "prepared.json").read_text())
    if "subset" in opts:
        _check_subset(ddir, dataset, spec, opts["subset"], root)
    table = pq.read_table(ddir / "manifest.parquet")
    man = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    classes = list(prepared["classes"])
    store = ClipStore([ddir / "shards" / s for s in prepared["shards"]], man["shard"], man["row"])
    lengths = man["num_samples"].astype(np.int64)
    labels = man["label"].astype(np.int64)
    per = int(round(float(opts["clip_seconds"]) * SAMPLE_RATE))
    clip_samples = per
    rng = np.random.default_rng(seed)
    extra = {}
    if spec.kind == "folds":
        folds = np.array([-1 if f is None else f for f in table.column("fold").to_pylist()], dtype=np.int64)
        present = sorted({int(f) for f in folds if f > 0})
        if fold not in present:
            raise ValueError(f"{dataset}: fold {fold} has no clips in {ddir}; folds present: {present}")
        test_rows = np.flatnonzero(folds == fold)
        train_rows = np.flatnonzero(folds != fold)
        train_rows, val_rows = _stratified_val(train_rows, labels, float(opts["val_fraction"]), rng)
        built = {"train": _single(train_rows, labels, lengths, per), "test": _single(test_rows, labels, lengths, per)}
        if len(val_rows):
            built["val"] = _single(val_rows, labels, lengths, per)
    elif spec.kind in ("splits", "concat"):
        split = man["split"]
        built = {}
        for name in ("train", "val", "test"):
            rows = np.flatnonzero(split == name)
            if spec.kind == "splits":
                built[name] = _single(rows, labels, lengths, per)
            else:
                n = int(opts["concat_n"])
                split_rng = np.random.default_rng([seed, ("train", "val", "test").index(name)])
                built[name] = _concat(rows, labels, lengths, n, per, split_rng)
        if spec.kind == "concat":
            clip_samples = int(opts["concat_n"]) * per
        if len(built["val"].labels) == 0:
            del built["val"]
    else:
        built, missing = _speaker_split(man, lengths, opts, per, seed)
        if not len(built["val"].labels):
            del built["val"]
        extra["speakers_missing"] = missing
    for name in ("train", "test"):
        if len(built[name].labels) == 0:
            raise ValueError(f"{dataset}: the {name} split is empty in {ddir} (fold={fold}, options={opts})")

    def clipset(name):
        ex = built[name]
        return ClipSet(store, ex, clip_samples, man["clip_id"][ex.clip[ex.ptr[:-1]]], f"{dataset}/{name}")

    sets = {name: clipset(name) for name in built}
    pool_tokens = int(opts["pool_tokens"]) if spec.kind == "concat" and opts["pool_tokens"] is not None else None
    first_clip = per if spec.kind == "concat" else None
    construction = {
        "dataset": dataset,
        "base": spec.base,
        "kind": spec.kind,
        "fold": fold,
        "seed": seed,
        "options": {k: opts[k] for k in sorted(opts)},
        "clip_samples": clip_samples,
        "counts": {name: len(s) for name, s in sets.items()},
        "composition_sha256": hashlib.sha256("".join(built[n].digest() for n in sorted(built)).encode()).hexdigest(),
        "prepared_fingerprint": prepared["fingerprint"],
        **extra,
    }
    key = hashlib.sha256(json.dumps([dataset, fold, seed, construction["options"]], sort_keys=True).encode()).hexdigest()[:12]
    sidecar = _write_sidecar(ddir, f"{dataset}-fold{fold}-seed{seed}-{key}", construction)
    info = {
        "dataset": dataset,
        "fold": fold,
        "seed": seed,
        "n_train": len(sets["train"]),
        "n_test": len(sets["test"]),
        "n_val": len(sets["val"]) if "val" in sets else 0,
        "clip_seconds": clip_samples / SAMPLE_RATE,
        "clip_samples": clip_samples,
        "classes": len(classes),
        "pool_tokens": pool_tokens,
        "first_clip_samples": first_clip,
        "options": construction["options"],
        "construction": str(sidecar),
        "composition_sha256": construction["composition_sha256"],
    }
    return Task(
        dataset=dataset,
        train=sets["train"],
        test=sets["test"],
        val=sets.get("val"),
        num_classes=len(classes),
        label_names=classes,
        clip_samples=clip_samples,
        info=info,
        pool_tokens=pool_tokens,
        first_clip_samples=first_clip,
    )
