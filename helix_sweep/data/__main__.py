"""python -m helix_sweep.data prepare|synth|info ... (see --help)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .layouts import REAL_DATASETS


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helix_sweep.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="decode a real dataset once into Arrow shards + manifest.parquet")
    p.add_argument("dataset", choices=sorted(REAL_DATASETS))
    p.add_argument("--source", required=True, help="directory, zip/tar archive, http(s) URL, or 'official'")
    p.add_argument("--root", required=True, help="data root; the result goes to <root>/<dataset>")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="raise: stop at the first bad file; skip: leave it out and list it in prepare_report.json")  # fmt: skip
    p.add_argument("--workers", type=positive_int, default=1, help="decoding processes")
    p.add_argument("--checksum", help="expected 'sha256:<hex>' or 'md5:<hex>' of the archive")
    p.add_argument("--shard-clips", type=positive_int, help="clips per shard (default: about 64 MB per shard)")
    p.add_argument("--subset", help="part of a source with subsets: " + "; ".join(
        f"{name}: {', '.join(spec.subsets)} (default {spec.default_subset})"
        for name, spec in REAL_DATASETS.items() if spec.subsets))
    s = sub.add_parser("synth", help="generate a built-in synthetic dataset now (open_task does it on first use)")
    s.add_argument("name", choices=("synth-textures", "synth-commands", "synth-speaker"))
    s.add_argument("--root", required=True)
    i = sub.add_parser("info", help="print what a prepared dataset holds")
    i.add_argument("dataset")
    i.add_argument("--root", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from .fetch import DownloadError
    from .layouts import PrepareError

    try:
        if args.command == "prepare":
            from .prepare import prepare

            ddir = prepare(args.dataset, args.source, args.root, on_error=args.on_error, workers=args.workers,
                           checksum=args.checksum, shard_clips=args.shard_clips, subset=args.subset)  # fmt: skip
        elif args.command == "synth":
            from .synthetic import ensure_synthetic

            ddir = ensure_synthetic(args.root, args.name)
        else:
            ddir = Path(args.root) / args.dataset
        marker = ddir / "prepared.json"
        if not marker.is_file():
            print(f"{args.dataset}: not prepared under {args.root}", file=sys.stderr)
            return 1
        done = json.loads(marker.read_text())
        subset = f" ({done['subset']})" if done.get("subset") else ""
        print(f"{ddir}{subset}: {done['num_clips']} clips, {len(done['classes'])} classes, "
              f"{len(done['shards'])} shards; "
              f"report counts {done['report_counts']}")  # fmt: skip
        return 0
    except (PrepareError, DownloadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
