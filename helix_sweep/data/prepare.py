"""Prepare a dataset once: source -> Arrow shards + manifest.parquet (+ report, + completion marker).

Layout of a prepared dataset `<root>/<dataset>/`:
  shards/shard-00000.arrow ...   clips (see shards.py), in manifest order
  shards/shard-00000.json ...    per-shard record; its presence marks the shard finished
  manifest.parquet               one row per clip: clip_id, label, label_name, fold, split, speaker,
                                 source, num_samples, shard, row, source_sample_rate, source_channels,
                                 source_subtype
  prepare_report.json            every skipped / excluded / cropped / padded / clipped file and why
  prepared.json                  written last: fingerprint, classes, counts; absent = not prepared
  download/, source/             only when the source was a URL or an archive

Restartable: shards are the unit of work and each is written atomically, so a killed prepare redoes at
most one shard. Idempotent: a finished prepare whose source fingerprint (every listed file's relative
path, size and mtime, plus the options) still matches is skipped; a changed fingerprint rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import urllib.parse
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .audio import SAMPLE_RATE, AudioError, Decoded, decode_file
from .fetch import archive_problem, download, file_digest, is_archive, parse_checksum, unpack
from .layouts import REAL_DATASETS, PrepareError, Problems, SourceClip
from .shards import write_shard

log = logging.getLogger(__name__)

PREPARE_VERSION = 1
SHARD_BYTES = 64 << 20  # target shard size; a killed prepare redoes at most one shard

MANIFEST_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("fold", pa.int32()),  # null where the dataset has no folds
        ("split", pa.string()),
        ("speaker", pa.string()),  # null where unknown
        ("source", pa.string()),  # path relative to the dataset root in the source
        ("num_samples", pa.int64()),  # at 16 kHz, native length (tasks pad/crop)
        ("shard", pa.int32()),
        ("row", pa.int32()),
        ("source_sample_rate", pa.int32()),
        ("source_channels", pa.int32()),
        ("source_subtype", pa.string()),
    ]
)


def write_json(path: Path, obj) -> None:
    """Atomic JSON write (temp + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def prepare_command(dataset: str, root: Path | str) -> str:
    return f"python -m helix_sweep.data prepare {dataset} --source <dir|archive|url> --root {root}"


def is_prepared(ddir: Path) -> bool:
    marker = ddir / "prepared.json"
    if not marker.is_file() or not (ddir / "manifest.parquet").is_file():
        return False
    shards = json.loads(marker.read_text()).get("shards", [])
    return all((ddir / "shards" / s).is_file() for s in shards)


def _decode_job(path: str) -> Decoded:
    return decode_file(path)


def _run_job(args) -> tuple[Decoded | None, str | None]:
    produce, job = args
    try:
        return produce(job), None
    except AudioError as err:
        return None, str(err)


def build(
    ddir: Path,
    name: str,
    classes: Sequence[str],
    clips: Sequence[SourceClip],
    produce: Callable,
    jobs: Sequence,
    fingerprint: str,
    report: list[dict],
    *,
    on_error: str = "raise",
    clip_seconds: float | None = None,
    workers: int = 1,
    shard_clips: int | None = None,
    extra: dict | None = None,
    progress: bool = True,
) -> Path:
    """Turn `clips` into shards + manifest under `ddir`; `produce(jobs[i])` gives clip i's Decoded.

    Used by real datasets (produce = decode a file) and synthetic ones (produce = generate a clip).
    """
    ddir = Path(ddir)
    marker = ddir / "prepared.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("fingerprint") == fingerprint and is_prepared(ddir):
            log.info("%s already prepared in %s; skipping", name, ddir)
            return ddir
        log.warning("%s: source or options changed since the last prepare in %s; rebuilding", name, ddir)
        marker.unlink()
    shards_dir = ddir / "shards"
    state = shards_dir / "state.json"
    if shards_dir.is_dir() and (not state.is_file() or json.loads(state.read_text()).get("fingerprint") != fingerprint):
        shutil.rmtree(shards_dir)  # shards of another source cannot be resumed
    shards_dir.mkdir(parents=True, exist_ok=True)
    write_json(state, {"fingerprint": fingerprint})

    if shard_clips is not None and shard_clips < 1:
        raise ValueError(f"shard_clips={shard_clips}: clips per shard must be >= 1")
    if shard_clips is None:
        per_clip = 2 * SAMPLE_RATE * (clip_seconds or 15.0)
        shard_clips = max(1, int(SHARD_BYTES // per_clip))
    chunks = [range(i, min(i + shard_clips, len(clips))) for i in range(0, len(clips), shard_clips)]
    label_of = {c: i for i, c in enumerate(classes)}
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    bar = tqdm(total=len(clips), unit="clip", desc=f"prepare {name}", disable=not progress)
    records, skipped = [], []
    try:
        for k, chunk in enumerate(chunks):
            meta_path = shards_dir / f"shard-{k:05d}.json"
            if meta_path.is_file():  # finished by an earlier (possibly killed) run
                meta = json.loads(meta_path.read_text())
            else:
                args = [(produce, jobs[i]) for i in chunk]
                results = pool.imap(_run_job, args) if pool else map(_run_job, args)
                meta, pcms = {"shard": f"shard-{k:05d}.arrow", "rows": [], "skipped": []}, []
                for i, (decoded, error) in zip(chunk, results):
                    clip = clips[i]
                    if error is not None:
                        if on_error != "skip":
                            raise PrepareError(f"{clip.source}: {error} (rerun with on_error=skip to skip and report it)")
                        meta["skipped"].append({"source": clip.source, "action": "skipped", "reason": error})
                        continue
                    pcms.append(decoded.pcm)
                    meta["rows"].append(
                        {
                            "index": i,
                            "num_samples": len(decoded.pcm),
                            "source_sample_rate": decoded.source_rate,
                            "source_channels": decoded.source_channels,
                            "source_subtype": decoded.source_subtype,
                            "clipped": decoded.clipped,
                        }
                    )
                write_shard(shards_dir / meta["shard"], [clips[r["index"]].clip_id for r in meta["rows"]], pcms)
                write_json(meta_path, meta)
            records.extend((k, row, r) for row, r in enumerate(meta["rows"]))
            skipped.extend(meta["skipped"])
            bar.update(len(chunk))
    finally:
        bar.close()
        if pool:
            pool.terminate()

    target = round(clip_seconds * SAMPLE_RATE) if clip_seconds else None
    columns = {f.name: [] for f in MANIFEST_SCHEMA}
    notes = []
    for k, row, r in records:
        clip = clips[r["index"]]
        for key, value in (
            ("clip_id", clip.clip_id), ("label", label_of[clip.label_name]), ("label_name", clip.label_name),
            ("fold", clip.fold), ("split", clip.split), ("speaker", clip.speaker), ("source", clip.source),
            ("num_samples", r["num_samples"]), ("shard", k), ("row", row),
            ("source_sample_rate", r["source_sample_rate"]), ("source_channels", r["source_channels"]),
            ("source_subtype", r["source_subtype"]),
        ):  # fmt: skip
            columns[key].append(value)
        if target and r["num_samples"] != target:
            action = "cropped" if r["num_samples"] > target else "padded"
            notes.append({"source": clip.source, "action": action,
                          "reason": f"{r['num_samples']} samples at 16 kHz, tasks use {target}"})  # fmt: skip
        if r["clipped"]:
            notes.append({"source": clip.source, "action": "clipped",
                          "reason": f"{r['clipped']} samples beyond full scale clipped to int16"})  # fmt: skip
    pq.write_table(pa.table(columns, schema=MANIFEST_SCHEMA), ddir / "manifest.parquet.tmp")
    os.replace(ddir / "manifest.parquet.tmp", ddir / "manifest.parquet")

    entries = report + skipped + notes
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["action"]] = counts.get(e["action"], 0) + 1
    write_json(ddir / "prepare_report.json", {"dataset": name, "on_error": on_error, "counts": counts, "entries": entries})
    write_json(
        marker,
        {
            "dataset": name,
            "version": PREPARE_VERSION,
            "fingerprint": fingerprint,
            "classes": list(classes),
            "num_clips": len(records),
            "clip_seconds": clip_seconds,
            "sample_rate": SAMPLE_RATE,
            "shards": [f"shard-{k:05d}.arrow" for k in range(len(chunks))],
            "report_counts": counts,
            **(extra or {}),
        },
    )
    for action, n in sorted(counts.items()):
        log.warning("%s: %d file(s) %s; see %s", name, n, action, ddir / "prepare_report.json")
    return ddir


def source_fingerprint(root: Path, files: Sequence[str], options: dict) -> str:
    """sha256 over every file's (relative path, size, mtime_ns) and the options."""
    h = hashlib.sha256(json.dumps({"version": PREPARE_VERSION, **options}, sort_keys=True).encode())
    for rel in sorted(files):
        try:
            st = (root / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
    return h.hexdigest()


def resolve_source(dataset: str, source: str | Path, ddir: Path, checksum: str | None, progress: bool,
                   subset: str | None = None) -> Path:
    """A directory is used as is; an archive is unpacked into <ddir>/source; a URL is downloaded first."""
    spec = REAL_DATASETS[dataset]
    url, url_checksum = spec.official(subset)
    text = str(source)
    if text == "official":
        if url is None:
            raise PrepareError(f"{dataset} has no official archive to download; pass the directory made by its own tools")
        text = url
    if text.startswith(("http://", "https://")):
        name = Path(urllib.parse.urlparse(text).path).name or f"{dataset}-source"
        known = url_checksum if text == url else None
        archive = download(text, ddir / "download" / name, checksum or known, progress=progress)
        return unpack(archive, ddir / "source")
    path = Path(source)
    if path.is_dir():
        return path
    if path.is_file() and (problem := archive_problem(path)):  # before is_archive: zeros pass as a tar
        raise PrepareError(f"{source}: named like an archive but cannot be read ({problem}); "
                           f"the file is corrupt or cut short: download it again")
    if is_archive(path):
        if checksum:
            algorithm, expected = parse_checksum(checksum)
            if file_digest(path, algorithm) != expected:
                raise PrepareError(f"{path}: {algorithm} does not match {expected}")
        return unpack(path, ddir / "source")
    if not path.exists():
        raise PrepareError(f"{source}: does not exist (not a directory, a zip/tar archive or an http(s) URL)")
    raise PrepareError(f"{source}: not a directory, a zip/tar archive or an http(s) URL")



def prepare(
    dataset: str,
    source: str | Path,
    root: str | Path,
    *,
    on_error: str = "raise",
    workers: int = 1,
    checksum: str | None = None,
    shard_clips: int | None = None,
    progress: bool = True,
    subset: str | None = None,
) -> Path:
    """Prepare a real dataset into `<root>/<dataset>`; returns that folder.

    on_error="raise" (default) stops at the first bad file or row with its path and the reason;
    on_error="skip" leaves it out and lists it with the reason in prepare_report.json.
    subset: which part of a source with subsets (LibriSpeech: train-clean-100, the default, or
    train-clean-360); recorded in prepared.json; preparing another subset rebuilds the folder.
    """
    if dataset not in REAL_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; prepare knows {sorted(REAL_DATASETS)}")
    spec = REAL_DATASETS[dataset]
    if subset is not None and subset not in spec.subsets:
        valid = f"one of {', '.join(spec.subsets)}" if spec.subsets else "none (it has no subsets)"
        raise PrepareError(f"{dataset}: subset={subset!r}; valid: {valid}")
    subset = subset or spec.default_subset
    ddir = Path(root) / dataset
    ddir.mkdir(parents=True, exist_ok=True)
    src = resolve_source(dataset, source, ddir, checksum, progress, subset)
    problems = Problems(on_error)
    listing = spec.read(Path(src), problems, subset=subset) if subset else spec.read(Path(src), problems)
    if not listing.clips:
        raise PrepareError(f"{src}: no {dataset} clips found" + (f" in subset {subset}" if subset else ""))
    files = [c.source for c in listing.clips] + listing.metadata_files
    options = {"dataset": dataset, "on_error": on_error, **({"subset": subset} if subset else {})}
    fingerprint = source_fingerprint(listing.root, files, options)
    jobs = [str(listing.root / c.source) for c in listing.clips]
    if subset:
        _note_class_count(dataset, subset, len(listing.classes))
    return build(
        ddir, dataset, listing.classes, listing.clips, _decode_job, jobs, fingerprint,
        problems.skipped + listing.notes, on_error=on_error, clip_seconds=spec.clip_seconds,
        workers=workers, shard_clips=shard_clips, progress=progress,
        extra={"source": str(listing.root), **({"subset": subset} if subset else {})},
    )  # fmt: skip


def _note_class_count(dataset: str, subset: str, found: int) -> None:
    """Log the classes found beside the catalog's count for the subset (search_spaces/datasets.yaml)."""
    from helix_sweep.config import dataset_catalog

    entry = dataset_catalog().get(dataset)
    expected = (entry.subsets.get(subset) or {}).get("num_classes") if entry is not None else None
    if expected is not None and expected != found:
        log.warning("%s %s: %d classes found, the catalog says %d (a partial or filtered source?)",
                    dataset, subset, found, expected)
    else:
        log.info("%s %s: %d classes", dataset, subset, found)
