"""Decoding: every sample format, rate and channel count UrbanSound8K has, and every kind of bad file."""

import numpy as np
import pytest
import soundfile as sf
import soxr

from data_fixtures import US8K_FORMATS, tone, write_audio
from helix_sweep.data.audio import AudioError, decode_file, decode_float, fit_length


@pytest.mark.parametrize("rate,subtype,channels", US8K_FORMATS)
def test_decode_every_format_to_mono_16k(tmp_path, rate, subtype, channels):
    path = write_audio(tmp_path / "a.wav", 1.5, rate, seed=3, subtype=subtype, channels=channels)
    d = decode_file(path)
    assert (d.source_rate, d.source_channels, d.source_subtype) == (rate, channels, subtype)
    assert d.pcm.dtype == np.int16 and d.pcm.ndim == 1
    assert abs(len(d.pcm) - 24000) <= 1
    # same result as reading the stored file, averaging channels and resampling with soxr HQ
    raw, _ = sf.read(str(path), dtype="float32", always_2d=True)
    mono = raw.mean(axis=1)
    expect = mono if rate == 16000 else soxr.resample(mono, rate, 16000, quality="HQ")
    tol = 2 / 32768 + (1 / 128 if subtype == "PCM_U8" else 0)
    np.testing.assert_allclose(d.pcm / 32768, expect, atol=tol)
    # and close to the signal that was written (8-bit quantisation is coarse)
    written = tone(1.5, rate, 3, channels)
    written = written.mean(axis=1) if channels > 1 else written
    ref = written if rate == 16000 else soxr.resample(written, rate, 16000)
    n = min(len(ref), len(d.pcm))
    assert np.abs(d.pcm[:n] / 32768 - ref[:n]).max() < (0.02 if subtype == "PCM_U8" else 1e-3)


def test_16k_pcm16_round_trips_exactly(tmp_path):
    path = write_audio(tmp_path / "a.wav", 1.0, 16000, seed=1)
    raw, _ = sf.read(str(path), dtype="int16")
    np.testing.assert_array_equal(decode_file(path).pcm, raw)
    np.testing.assert_allclose(decode_float(path), raw / 32768, atol=1e-7)


def test_flac_and_ogg(tmp_path):
    flac = write_audio(tmp_path / "a.flac", 1.0, 22050, seed=1, subtype="PCM_24", fmt="FLAC")
    ogg = write_audio(tmp_path / "a.ogg", 1.0, 44100, seed=1, subtype="VORBIS", fmt="OGG", channels=2)
    assert abs(len(decode_file(flac).pcm) - 16000) <= 1
    assert abs(len(decode_file(ogg).pcm) - 16000) <= 1


def test_float_beyond_full_scale_is_clipped_and_counted(tmp_path):
    sf.write(str(tmp_path / "loud.wav"), np.full(1600, 1.5, np.float32), 16000, subtype="FLOAT")
    d = decode_file(tmp_path / "loud.wav")
    assert d.clipped == 1600 and d.pcm.max() == 32767


def _bad(tmp_path, kind):
    good = write_audio(tmp_path / "good.wav", 1.0, 44100, seed=0)
    data = good.read_bytes()
    path = tmp_path / f"{kind}.wav"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "header-only":
        path.write_bytes(data[:44])
    elif kind == "nan":
        sf.write(str(path), np.array([0.1, np.nan, 0.2] * 100, np.float32), 16000, subtype="FLOAT")
    elif kind == "zero-frames":
        sf.write(str(path), np.zeros(0, np.float32), 16000)
    elif kind == "unreadable":
        path = tmp_path / "missing.wav"
    return path


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("empty", "unreadable"),
        ("corrupt", "unreadable"),
        ("truncated", "truncated"),
        ("header-only", "truncated"),
        ("nan", "non-finite"),
        ("zero-frames", "empty"),
        ("unreadable", "unreadable"),
    ],
)
def test_bad_files_raise_with_reason(tmp_path, kind, reason):
    with pytest.raises(AudioError, match=reason):
        decode_file(_bad(tmp_path, kind))


def test_fit_length():
    x = np.arange(5, dtype=np.int16)
    np.testing.assert_array_equal(fit_length(x, 3), [0, 1, 2])
    np.testing.assert_array_equal(fit_length(x, 7), [0, 1, 2, 3, 4, 0, 0])
