"""Getting a source onto disk: resumable download, checksum, unpack.

`download` keeps the bytes received so far in `<dest>.part`; the next call asks the server for the
rest with an HTTP Range request (a server that ignores Range answers 200 and the file starts over).
The finished file is checked against the expected checksum before it is renamed into place.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class DownloadError(Exception):
    """A download that failed or whose checksum does not match; names the URL."""


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def parse_checksum(checksum: str) -> tuple[str, str]:
    """'sha256:<hex>' or 'md5:<hex>' -> (algorithm, hex)."""
    algorithm, _, digest = checksum.partition(":")
    if algorithm not in ("sha256", "md5", "sha1") or not digest:
        raise ValueError(f"checksum must look like 'sha256:<hex>' or 'md5:<hex>', got {checksum!r}")
    return algorithm, digest.lower()


def download(url: str, dest: Path, checksum: str | None = None, progress: bool = True, timeout: float = 60) -> Path:
    """Download `url` to `dest`, resuming a partial `<dest>.part`; verify `checksum` if given.

    Without a checksum the sha256 of the file is logged so it can be pinned next time.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part file is already complete
            response = None
        else:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"{url}: {err}") from err
    if response is not None:
        with response:
            resumed = response.status == 206
            if have and not resumed:
                log.info("%s: server ignored the Range request; starting over", url)
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar:
                try:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        f.write(block)
                        bar.update(len(block))
                except (OSError, urllib.error.URLError, http.client.HTTPException) as err:
                    raise DownloadError(f"{url}: interrupted after {f.tell()} bytes ({err}); run again to resume") from err
            if total is not None and part.stat().st_size < total:
                raise DownloadError(
                    f"{url}: connection closed after {part.stat().st_size} of {total} bytes; run again to resume"
                )
    if checksum:
        algorithm, expected = parse_checksum(checksum)
        got = file_digest(part, algorithm)
        if got != expected:
            part.unlink()  # a wrong file cannot be resumed into a right one
            raise DownloadError(f"{url}: {algorithm} mismatch, expected {expected}, got {got}; the download was removed")
    else:
        log.warning("%s: no checksum known; sha256 is %s (pass --checksum to pin it)", url, file_digest(part, "sha256"))
    os.replace(part, dest)
    return dest


def is_archive(path: Path) -> bool:
    return path.is_file() and (zipfile.is_zipfile(path) or tarfile.is_tarfile(path))


# archive suffix -> tarfile mode ("zip" for zip files)
ARCHIVE_MODES = {".zip": "zip", ".tar": "r:", ".tar.gz": "r:gz", ".tgz": "r:gz", ".tar.bz2": "r:bz2",
                 ".tbz2": "r:bz2", ".tar.xz": "r:xz", ".txz": "r:xz"}


def archive_problem(path: Path) -> str | None:
    """For a file named like an archive that does not open: the reader's own error; else None."""
    name = Path(path).name.lower()
    mode = next((m for suffix, m in ARCHIVE_MODES.items() if name.endswith(suffix)), None)
    if mode is None:
        return None
    try:
        if mode == "zip":
            zipfile.ZipFile(path).close()
        else:  # the mode its name promises, so the error is that reader's, not a list of four
            with tarfile.open(path, mode) as t:
                t.getmembers()
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack a zip/tar(.gz/.bz2/.xz) archive into `dest` once; an unchanged archive is not unpacked again.

    Unpacks into `<dest>.tmp` and renames, so a killed unpack leaves nothing that looks finished.
    """
    archive, dest = Path(archive), Path(dest)
    stat = archive.stat()
    stamp = {"archive": str(archive.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = dest / ".unpacked.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("unpacking %s into %s", archive, dest)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")  # refuses absolute paths and links out of tmp
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive}: cannot unpack: {err}") from err
    (tmp / ".unpacked.json").write_text(json.dumps(stamp))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest
