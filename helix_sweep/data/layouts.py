"""Readers of the real datasets' on-disk layouts: source directory -> list of clips with labels.

Each reader finds the dataset inside the source (the directory itself or a folder below it), reads the
official metadata and returns a `Listing`. Nothing is decoded here. Metadata problems (a CSV row naming
a missing file, a label outside the class list, a fold out of range) go through `Problems`: with
on_error="raise" the first one raises PrepareError naming the file and the reason; with
on_error="skip" the row is left out and recorded for the prepare report.

Manifest conventions set here:
- split: the source's official split where it has one (Speech Commands lists, VoxPopuli's tsv files:
  "train", "val", "test"), else "all" (ESC-50 and UrbanSound8K use folds; LibriSpeech speaker ID is
  re-split per speaker at task time).
- fold: 1-based where the dataset defines folds, else None. speaker: the source's speaker id or None.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Class lists in label order (label = index). ESC-50's order is its `target` column, UrbanSound8K's
# its `classID` column; Speech Commands v0.02's 35 words are sorted alphabetically.
ESC50_CLASSES = [
    "dog", "rooster", "pig", "cow", "frog", "cat", "hen", "insects", "sheep", "crow",
    "rain", "sea_waves", "crackling_fire", "crickets", "chirping_birds", "water_drops", "wind",
    "pouring_water", "toilet_flush", "thunderstorm", "crying_baby", "sneezing", "clapping",
    "breathing", "coughing", "footsteps", "laughing", "brushing_teeth", "snoring",
    "drinking_sipping", "door_wood_knock", "mouse_click", "keyboard_typing", "door_wood_creaks",
    "can_opening", "washing_machine", "vacuum_cleaner", "clock_alarm", "clock_tick",
    "glass_breaking", "helicopter", "chainsaw", "siren", "car_horn", "engine", "train",
    "church_bells", "airplane", "fireworks", "hand_saw",
]  # fmt: skip
URBANSOUND8K_CLASSES = [
    "air_conditioner", "car_horn", "children_playing", "dog_bark", "drilling", "engine_idling",
    "gun_shot", "jackhammer", "siren", "street_music",
]  # fmt: skip
SPEECHCOMMANDS_CLASSES = sorted(
    "backward bed bird cat dog down eight five follow forward four go happy house learn left marvin "
    "nine no off on one right seven sheila six stop three tree two up visual wow yes zero".split()
)
VOXPOPULI_COLUMNS = [
    "id", "raw_text", "normalized_text", "speaker_id", "split", "gender", "is_gold_transcript", "accent",
]  # fmt: skip


class PrepareError(Exception):
    """Bad source data; the message names the file (and row or key) and the reason."""


@dataclass(frozen=True)
class SourceClip:
    clip_id: str
    source: str  # path relative to the dataset root inside the source, posix style
    label_name: str
    fold: int | None
    split: str
    speaker: str | None


@dataclass
class Problems:
    """Collects metadata problems; raises at once unless on_error == "skip"."""

    on_error: str
    skipped: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    def add(self, where: str, reason: str) -> None:
        if self.on_error == "raise":
            raise PrepareError(f"{where}: {reason} (rerun with on_error=skip to skip and report such files)")
        self.skipped.append({"source": where, "action": "skipped", "reason": reason})


@dataclass
class Listing:
    root: Path  # the dataset root inside the source; SourceClip.source is relative to it
    classes: list[str]
    clips: list[SourceClip]
    metadata_files: list[str]  # relative paths whose content defines the listing (for the fingerprint)
    notes: list[dict] = field(default_factory=list)  # rows left out by design, e.g. no speaker id


def find_root(source: Path, marker: str, dataset: str) -> Path:
    """The folder at or below `source` (3 levels deep at most) that contains `marker`."""
    source = Path(source)
    for depth in range(4):
        pattern = "/".join(["*"] * depth + [marker]) if depth else marker
        hits = sorted(source.glob(pattern))
        if hits:
            return Path(str(hits[0])[: -len(marker)]).resolve()
    raise PrepareError(f"{source}: no {marker} found at or below it; is this a {dataset} source?")


def _read_csv(path: Path, required: list[str]) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise PrepareError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
            return list(reader)
    except (OSError, UnicodeDecodeError) as err:
        raise PrepareError(f"{path}: unreadable metadata: {err}") from err


def _int(row: dict, key: str, where: str, problems: Problems) -> int | None:
    try:
        return int(row[key])
    except (TypeError, ValueError):
        problems.add(where, f"column {key!r} is not an integer: {row[key]!r}")
        return None


@dataclass(frozen=True)
class FoldedCsvLayout:
    """A dataset described by one metadata CSV with a row per clip: file name, fold, label id and
    label name (ESC-50, UrbanSound8K). Column names are the source's own."""

    dataset: str  # the name in error messages
    meta: str  # the metadata CSV, relative to the dataset root
    file_key: str
    fold_key: str
    num_folds: int
    label_key: str
    name_key: str
    classes: list[str]  # label order
    audio_dir: Callable[[dict], str]  # row -> folder of its audio file, relative to the dataset root
    speaker_key: str | None = None


def read_folded_csv(source: Path, layout: FoldedCsvLayout, problems: Problems) -> Listing:
    """Check each row (integer fold in range, label id in the class list and matching its name, audio
    file present) and list the clips; split "all", since these datasets are split by fold."""
    root = find_root(source, layout.meta, layout.dataset)
    meta = root / layout.meta
    required = [layout.file_key] + ([layout.speaker_key] if layout.speaker_key else [])
    rows = _read_csv(meta, required + [layout.fold_key, layout.label_key, layout.name_key])
    classes, clips = layout.classes, []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{meta} line {i} ({row[layout.file_key]})"
        rel = f"{layout.audio_dir(row)}/{row[layout.file_key]}"
        fold, label = _int(row, layout.fold_key, where, problems), _int(row, layout.label_key, where, problems)
        if fold is None or label is None:
            continue
        if not 1 <= fold <= layout.num_folds:
            problems.add(where, f"fold {fold} out of range 1..{layout.num_folds}")
        elif not 0 <= label < len(classes):
            problems.add(where, f"label {layout.label_key}={label} outside the class list (0..{len(classes) - 1})")
        elif row[layout.name_key] != classes[label]:
            problems.add(where, f"{layout.name_key}={row[layout.name_key]!r} does not match "
                                f"{layout.label_key}={label} ({classes[label]!r})")
        elif not (root / rel).is_file():
            problems.add(where, f"names a missing file {root / rel}")
        else:
            speaker = row[layout.speaker_key] if layout.speaker_key else None
            clips.append(SourceClip(Path(row[layout.file_key]).stem, rel, classes[label], fold, "all", speaker))
    return Listing(root, list(classes), clips, [layout.meta])


ESC50_LAYOUT = FoldedCsvLayout(
    "ESC-50", "meta/esc50.csv", "filename", "fold", 5, "target", "category", ESC50_CLASSES,
    audio_dir=lambda row: "audio",
)  # fmt: skip
URBANSOUND8K_LAYOUT = FoldedCsvLayout(
    "UrbanSound8K", "metadata/UrbanSound8K.csv", "slice_file_name", "fold", 10, "classID", "class",
    URBANSOUND8K_CLASSES, audio_dir=lambda row: f"audio/fold{row['fold']}", speaker_key="fsID",
)  # fmt: skip


def read_esc50(source: Path, problems: Problems) -> Listing:
    return read_folded_csv(source, ESC50_LAYOUT, problems)


def read_urbansound8k(source: Path, problems: Problems) -> Listing:
    return read_folded_csv(source, URBANSOUND8K_LAYOUT, problems)


def read_speechcommands(source: Path, problems: Problems) -> Listing:
    root = find_root(source, "testing_list.txt", "Speech Commands v0.02")
    lists = {}
    for split, name in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
        path = root / name
        try:
            entries = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        except OSError as err:
            raise PrepareError(f"{path}: unreadable list: {err}") from err
        for n, rel in enumerate(entries, start=1):
            if not (root / rel).is_file():
                problems.add(f"{path} line {n}", f"names a missing file {root / rel}")
            else:
                lists[rel] = split
    clips = []
    known = set(SPEECHCOMMANDS_CLASSES)
    for word_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if word_dir.name == "_background_noise_" or word_dir.name.startswith("."):
            continue  # background noise is not a class
        wavs = sorted(word_dir.glob("*.wav"))
        if word_dir.name not in known:
            for wav in wavs:
                problems.add(str(wav), f"label {word_dir.name!r} outside the 35-word class list")
            continue
        for wav in wavs:
            rel = f"{word_dir.name}/{wav.name}"
            speaker = wav.name.split("_nohash_")[0] if "_nohash_" in wav.name else None
            clips.append(SourceClip(rel[:-4], rel, word_dir.name, None, lists.get(rel, "train"), speaker))
    return Listing(root, list(SPEECHCOMMANDS_CLASSES), clips, ["validation_list.txt", "testing_list.txt"])


def _speakers_txt(path: Path) -> dict[str, str]:
    """LibriSpeech SPEAKERS.TXT: ';' comment lines, then 'ID | SEX | SUBSET | MINUTES | NAME'."""
    subsets = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise PrepareError(f"{path}: unreadable: {err}") from err
    for n, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 3:
            raise PrepareError(f"{path} line {n}: expected 'ID | SEX | SUBSET | MINUTES | NAME', got {line!r}")
        subsets[cells[0]] = cells[2]
    return subsets


def read_librispeech(source: Path, problems: Problems, subset: str = "train-clean-100") -> Listing:
    """One subset's speakers (the classes, from SPEAKERS.TXT's SUBSET column) and utterances: the
    <subset>/<speaker>/<chapter>/ folder next to SPEAKERS.TXT (the official archives unpack into one
    LibriSpeech/ folder, so several subsets can share it)."""
    root = find_root(source, "SPEAKERS.TXT", "LibriSpeech")
    subsets = _speakers_txt(root / "SPEAKERS.TXT")
    audio_root = root / subset
    if not audio_root.is_dir():
        raise PrepareError(f"{root}: no {subset}/ folder next to SPEAKERS.TXT")
    clips, speakers = [], []
    for spk_dir in sorted((p for p in audio_root.iterdir() if p.is_dir()), key=lambda p: int(p.name)):
        if subsets.get(spk_dir.name) != subset:
            where = subsets.get(spk_dir.name, "absent")
            problems.add(str(spk_dir), f"speaker {spk_dir.name} outside the class list (SPEAKERS.TXT: {where})")
            continue
        speakers.append(spk_dir.name)
        for chapter in sorted(p for p in spk_dir.iterdir() if p.is_dir()):
            trans = chapter / f"{spk_dir.name}-{chapter.name}.trans.txt"
            listed = []
            if trans.is_file():
                listed = [ln.split(" ", 1)[0] for ln in trans.read_text().splitlines() if ln.strip()]
            else:
                problems.add(str(trans), "transcript file missing")
            found = {p.stem for p in chapter.glob("*.flac")}
            for utt in listed:
                if utt not in found:
                    problems.add(f"{trans} ({utt})", f"names a missing file {chapter / (utt + '.flac')}")
            for utt in sorted(found):
                rel = f"{subset}/{spk_dir.name}/{chapter.name}/{utt}.flac"
                clips.append(SourceClip(utt, rel, spk_dir.name, None, "all", spk_dir.name))
    return Listing(root, speakers, clips, ["SPEAKERS.TXT"])


def read_voxpopuli(source: Path, problems: Problems, lang: str = "en") -> Listing:
    """VoxPopuli after its get_asr_data step; rows without a speaker id are left out and noted."""
    root = find_root(source, f"transcribed_data/{lang}", "VoxPopuli")
    audio_root = root / "transcribed_data" / lang
    tsvs = []
    for split in ("train", "dev", "test"):
        hits = [p for p in (audio_root / f"asr_{split}.tsv", root / f"asr_{split}.tsv") if p.is_file()]
        if not hits:
            raise PrepareError(f"{audio_root}: asr_{split}.tsv not found there or in {root}")
        tsvs.append((split, hits[0]))
    clips, notes = [], []
    for split, tsv in tsvs:
        with open(tsv, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = [c for c in ("id", "speaker_id") if c not in (reader.fieldnames or [])]
            if missing:
                raise PrepareError(f"{tsv}: missing column(s) {missing}; found {reader.fieldnames}")
            for n, row in enumerate(reader, start=2):
                rel = f"transcribed_data/{lang}/{row['id'][:4]}/{row['id']}.ogg"
                speaker = (row["speaker_id"] or "").strip()
                if speaker in ("", "None"):
                    notes.append({"source": rel, "action": "excluded", "reason": f"{tsv.name} line {n}: no speaker id"})
                elif not (root / rel).is_file():
                    problems.add(f"{tsv} line {n} ({row['id']})", f"names a missing file {root / rel}")
                else:
                    clips.append(SourceClip(row["id"], rel, speaker, None, "val" if split == "dev" else split, speaker))
    speakers = sorted({c.speaker for c in clips})
    meta = [str(p.relative_to(root)) for _, p in tsvs]
    return Listing(root, speakers, clips, meta, notes)


@dataclass(frozen=True)
class RealDataset:
    name: str
    read: Callable[..., Listing]  # (source, problems[, subset=]) -> Listing
    clip_seconds: float | None  # nominal clip length (pad/crop target), None for utterances
    url: str | None  # official archive; "{subset}" in it is the subset's name
    checksum: str | None  # "sha256:<hex>" or "md5:<hex>" of that archive (per subset: `subsets`)
    # source subsets the reader can list -> the checksum of each one's official archive (None: not pinned);
    # the first is the default. Their speaker counts are the study's: search_spaces/datasets.yaml `subsets`
    subsets: dict[str, str | None] = field(default_factory=dict)

    @property
    def default_subset(self) -> str | None:
        return next(iter(self.subsets), None)

    def official(self, subset: str | None) -> tuple[str | None, str | None]:
        """(url, checksum) of the official archive (of `subset`)."""
        if self.url is None or not self.subsets:
            return self.url, self.checksum
        return self.url.format(subset=subset), self.subsets[subset]


REAL_DATASETS = {
    "esc50": RealDataset(
        "esc50", read_esc50, 5.0, "https://github.com/karoldvl/ESC-50/archive/master.zip",
        None,  # a branch archive: GitHub regenerates it, so no fixed checksum exists (pass --checksum)
    ),
    "urbansound8k": RealDataset(
        "urbansound8k", read_urbansound8k, 4.0,
        "https://zenodo.org/record/1203745/files/UrbanSound8K.tar.gz", "md5:9aa69802bbf37fb986f71ec1483a196e",
    ),
    "speechcommands": RealDataset(
        "speechcommands", read_speechcommands, 1.0,
        "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
        "sha256:af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58",
    ),
    "librispeech": RealDataset(
        "librispeech", read_librispeech, None, "https://www.openslr.org/resources/12/{subset}.tar.gz", None,
        subsets={
            "train-clean-100": "sha256:d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
            "train-clean-360": None,  # not pinned here: the download logs its sha256 (pass --checksum to check it)
        },
    ),
    # VoxPopuli has no single archive: its get_asr_data script segments the raw sessions; pass that
    # output directory (or an archive/URL of it with --checksum).
    "voxpopuli": RealDataset("voxpopuli", read_voxpopuli, None, None, None),
}
