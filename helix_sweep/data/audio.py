"""Decoding one source file into the study's sample format: mono, 16 kHz, 16-bit PCM.

Every dataset goes through `decode_file`, so there is one decoder (libsndfile via soundfile) and one
resampler (soxr, "HQ") everywhere: the training data, the benchmark's per-item path and the tests.

Stored format: int16 PCM at 16 kHz (x_int = round(x * 32768), clipped to the int16 range). A 16-bit
source at 16 kHz round-trips exactly; anything else loses at most 1/65536 of full scale, far below the
augmentation noise (sigma 0.005). Float sources beyond full scale are clipped and the count reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
PCM_SCALE = 32768.0  # int16 sample value of full scale (+1.0)

# libsndfile logs a truncated WAV/AIFF data chunk as "data : <header bytes> (should be <real bytes>)".
_TRUNCATED = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


class AudioError(Exception):
    """A source file that cannot become a clip; the message says why (the caller adds the path)."""


@dataclass(frozen=True)
class Decoded:
    pcm: np.ndarray  # (T,) int16, mono, 16 kHz
    source_rate: int
    source_channels: int
    source_subtype: str  # libsndfile's name for the sample format: PCM_16, PCM_U8, FLOAT, VORBIS, ...
    clipped: int  # samples clipped to full scale while converting to int16


def resample(x: np.ndarray, rate: int) -> np.ndarray:
    """(T,) float32 at `rate` -> float32 at 16 kHz with soxr's HQ filter (the project's one resampler)."""
    if rate == SAMPLE_RATE:
        return x
    return soxr.resample(x, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


def to_pcm16(x: np.ndarray) -> tuple[np.ndarray, int]:
    """float in [-1, 1) -> (int16 PCM, number of samples that had to be clipped)."""
    scaled = np.rint(x * PCM_SCALE)
    clipped = int(np.count_nonzero((scaled > 32767) | (scaled < -32768)))
    return np.clip(scaled, -32768, 32767).astype(np.int16), clipped


def read_float(path: str | Path) -> tuple[np.ndarray, int, int, str]:
    """Decode a file to (frames, channels) float32 with its rate; raises AudioError on any bad input."""
    try:
        with sf.SoundFile(str(path)) as f:
            truncated = _TRUNCATED.search(f.extra_info)
            if truncated and int(truncated.group(1)) > int(truncated.group(2)):
                raise AudioError(
                    f"truncated: the header declares {truncated.group(1)} data bytes, "
                    f"the file holds {truncated.group(2)}"
                )
            data = f.read(dtype="float32", always_2d=True)
            rate, channels, subtype = f.samplerate, f.channels, f.subtype
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"unreadable: {err}") from err
    if data.shape[0] == 0:
        raise AudioError("empty: no audio frames")
    if not np.isfinite(data).all():
        raise AudioError("corrupt: non-finite sample values (NaN or inf)")
    return data, rate, channels, subtype


def decode_file(path: str | Path) -> Decoded:
    """Source file -> mono 16 kHz int16 PCM. Downmix is the mean of the channels."""
    data, rate, channels, subtype = read_float(path)
    mono = data.mean(axis=1, dtype=np.float32)  # (T,)
    pcm, clipped = to_pcm16(resample(mono, rate))
    return Decoded(pcm, rate, channels, subtype, clipped)


def decode_float(path: str | Path) -> np.ndarray:
    """Source file -> mono 16 kHz float32, the per-item path (the benchmark's baseline)."""
    data, rate, _, _ = read_float(path)
    return resample(data.mean(axis=1, dtype=np.float32), rate)


def fit_length(x: np.ndarray, num_samples: int) -> np.ndarray:
    """Crop the end off, or zero-pad at the end, to exactly `num_samples`."""
    if len(x) >= num_samples:
        return x[:num_samples]
    return np.concatenate([x, np.zeros(num_samples - len(x), dtype=x.dtype)])
