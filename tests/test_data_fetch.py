"""Download against a local HTTP server on 127.0.0.1: progress, Range resume, checksum, unpack."""

import hashlib
import subprocess
import sys

import pytest

from data_fixtures import make_archive, make_esc50, range_server
from helix_sweep.data.fetch import DownloadError, download
from helix_sweep.data.layouts import PrepareError
from helix_sweep.data.prepare import prepare


@pytest.fixture
def payload(tmp_path):
    d = tmp_path / "served"
    d.mkdir()
    data = bytes(range(256)) * 4000 + b"tail"  # ~1 MB
    (d / "blob.bin").write_bytes(data)
    return d, data, "sha256:" + hashlib.sha256(data).hexdigest()


def test_interrupted_download_resumes_with_range(tmp_path, payload):
    served, data, checksum = payload
    dest = tmp_path / "dl" / "blob.bin"
    with range_server(served, cut_after=300_000) as (url, server):
        with pytest.raises(DownloadError, match="run again to resume"):
            download(f"{url}/blob.bin", dest, checksum, progress=False)
        part = dest.with_name("blob.bin.part")
        assert part.stat().st_size == 300_000 and not dest.exists()
        download(f"{url}/blob.bin", dest, checksum, progress=True)
        assert [r["range"] for r in server.requests] == [None, "bytes=300000-"]
    assert dest.read_bytes() == data and not part.exists()


def test_complete_part_file_gets_416_and_is_kept(tmp_path, payload):
    served, data, checksum = payload
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(data)
    with range_server(served) as (url, server):
        download(f"{url}/blob.bin", dest, checksum, progress=False)
    assert dest.read_bytes() == data and server.requests[0]["range"] == f"bytes={len(data)}-"


def test_server_without_range_starts_over(tmp_path, payload):
    served, data, checksum = payload
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"stale bytes")
    with range_server(served, honour_range=False) as (url, _):
        download(f"{url}/blob.bin", dest, checksum, progress=False)
    assert dest.read_bytes() == data


def test_checksum_mismatch_removes_the_download(tmp_path, payload):
    served, _, _ = payload
    dest = tmp_path / "blob.bin"
    with range_server(served) as (url, _):
        with pytest.raises(DownloadError, match="sha256 mismatch"):
            download(f"{url}/blob.bin", dest, "sha256:" + "0" * 64, progress=False)
        with pytest.raises(DownloadError, match="HTTP 404"):
            download(f"{url}/nope.bin", dest, None, progress=False)
    assert not dest.exists() and not dest.with_name("blob.bin.part").exists()


def test_prepare_from_url(tmp_path):
    src = make_esc50(tmp_path / "src", targets=(0, 1), folds=(1, 2))
    served = tmp_path / "served"
    served.mkdir()
    archive = make_archive(src, served / "master.zip")
    checksum = "md5:" + hashlib.md5(archive.read_bytes()).hexdigest()
    with range_server(served, cut_after=5000) as (url, server):
        with pytest.raises(DownloadError):
            prepare("esc50", f"{url}/master.zip", tmp_path / "root", checksum=checksum, progress=False)
        ddir = prepare("esc50", f"{url}/master.zip", tmp_path / "root", checksum=checksum, progress=False)
        assert server.requests[-1]["range"] == "bytes=5000-"
    assert (ddir / "download" / "master.zip").is_file()
    assert (ddir / "prepared.json").is_file()


@pytest.mark.parametrize("name,payload,needle", [
    ("ESC-50-master.tar.gz", b"\x00" * 4096, "not a gzip file"),
    ("ESC-50-master.tgz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + b"\xff" * 4096, "zlib error"),
    ("ESC-50-master.zip", b"PK\x03\x04 cut short", "BadZipFile"),
])
def test_a_corrupt_archive_is_named_with_the_readers_error(tmp_path, name, payload, needle):
    src = tmp_path / name
    src.write_bytes(payload)
    with pytest.raises(PrepareError) as err:
        prepare("esc50", src, tmp_path / "root", progress=False)
    assert str(src) in str(err.value) and needle in str(err.value) and "corrupt" in str(err.value)
    assert not (tmp_path / "root" / "esc50" / "prepared.json").exists()


def test_shard_clips_below_one_is_refused(tmp_path):
    src = make_esc50(tmp_path / "src", targets=(0,), folds=(1,), seconds=0.5)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"shard_clips={bad}"):
            prepare("esc50", src, tmp_path / "root", shard_clips=bad, progress=False)
    assert not (tmp_path / "root" / "esc50" / "prepared.json").exists()
    proc = subprocess.run([sys.executable, "-m", "helix_sweep.data", "prepare", "esc50", "--source", str(src),
                           "--root", str(tmp_path / "root"), "--shard-clips", "-1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--shard-clips: -1: must be >= 1" in proc.stderr
