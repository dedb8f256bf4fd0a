"""The paper's numbers (SPEC "Results to compare against") and the study's names and order."""

from __future__ import annotations

from dataclasses import dataclass

from helix_sweep.config import dataset_catalog, variant_catalog
from helix_sweep.sweep import schema as S


@dataclass(frozen=True)
class PaperResult:
    acc: float | None  # percent; None when the run did not finish (see status)
    std: float | None = None  # over folds, when the dataset has folds
    epochs: int | None = None  # epochs reached, where the paper says
    status: str = S.FINISHED  # or S.OOM


PAPER_RESULTS: dict[str, dict[str, PaperResult]] = {
    "esc50": {
        "mamba-raw": PaperResult(55.10, 3.33), "mamba-mel": PaperResult(53.75, 2.92),
        "helix-raw": PaperResult(50.20, 3.71), "helix-mel": PaperResult(51.85, 2.41),
        "attention-raw": PaperResult(44.60, 3.16), "attention-mel": PaperResult(46.10, 2.97),
    },
    "speechcommands": {
        "mamba-raw": PaperResult(90.27, epochs=76), "mamba-mel": PaperResult(92.36, epochs=86),
        "helix-raw": PaperResult(92.94, epochs=81), "helix-mel": PaperResult(92.44, epochs=94),
        "attention-raw": PaperResult(82.43, epochs=100), "attention-mel": PaperResult(91.27, epochs=100),
    },
    "speechcommands-concat": {
        "helix-raw": PaperResult(91.31, epochs=24), "mamba-raw": PaperResult(89.81, epochs=24),
    },
    "voxpopuli": {
        "helix-raw": PaperResult(85.07), "mamba-raw": PaperResult(73.55),
        "attention-raw": PaperResult(None, status=S.OOM),
    },
}

# Feasibility on one 48 GB GPU, as the paper states it, by dataset.
PAPER_FEASIBILITY: dict[str, str] = {
    "esc50": "500 tokens: all three backbones train",
    "librispeech": "3,000 tokens: pure attention slow (>2x pure Mamba's wall time)",
    "voxpopuli": "30,000 tokens: pure attention out of memory",
}

# The paper's Table 1 cell by cell (raw frontend; backbone -> ok | slow | oom), by dataset.
PAPER_FEASIBILITY_CELLS: dict[str, dict[str, str]] = {
    "esc50": {"mamba": "ok", "helix": "ok", "attention": "ok"},
    "librispeech": {"mamba": "ok", "helix": "ok", "attention": "slow"},
    "voxpopuli": {"mamba": "ok", "helix": "ok", "attention": "oom"},
}
SLOW_FACTOR = 2.0  # the paper's "slow": more than 2x pure Mamba's wall time on the same data

# What the paper says about a dataset that the runs' own figures must be read against, by dataset.
PAPER_DATASET_NOTES: dict[str, str] = {
    "librispeech": ("the paper says train-clean-100 with 921 speakers, but 921 is train-clean-360's speaker count "
                    "(train-clean-100 has 251): prepare either with `python -m helix_sweep.data prepare librispeech "
                    "--subset NAME` and set dataset_defs.librispeech.options.subset"),
}

# Which of the paper's tables a dataset's table reproduces, by the table kind of results.dataset_kind.
PAPER_TABLE = {"feasibility": 1, "folds": 2, "single": 3, "long_memory": 4, "speaker": 5}
SMOOTH_EPOCHS = 7  # the paper's curves (Figures 4-7) are smoothed over 7 epochs


def paper_acc(dataset: str, variant: str) -> float | None:
    """The paper's best test accuracy (%) for a dataset and variant, None where it gives none."""
    p = PAPER_RESULTS.get(paper_key(dataset) or "", {}).get(variant)
    return p.acc if p is not None else None


BACKBONE_TITLES = {"mamba": "pure Mamba", "helix": "HELIX", "attention": "pure attention"}
# tables and figures follow the catalogs' order (search_spaces/variants.yaml, datasets.yaml)
VARIANT_ORDER = list(variant_catalog())
DATASET_ORDER = list(dataset_catalog())


def paper_key(dataset: str) -> str | None:
    """The PAPER_RESULTS key a dataset name compares against (librispeech-speakers -> librispeech)."""
    for key in sorted(set(PAPER_RESULTS) | set(PAPER_FEASIBILITY), key=len, reverse=True):
        if dataset == key or dataset.startswith(key + "-"):  # longest key first: -concat beats speechcommands
            return key
    return None



def dataset_title(dataset: str) -> str:
    entry = dataset_catalog().get(dataset)
    return entry.title if entry is not None and entry.title else dataset
