"""Built-in synthetic datasets: procedural 16 kHz audio, one per regime of the study, no download.

- synth-textures (ESC-50-like, 5 folds, 1 s): stationary textures: low noise band, high noise band,
  tremolo (amplitude-modulated) noise, chirp train, harmonic buzz, crackle. Parameters overlap between
  draws and every clip sits in pink background noise at a random SNR (3-18 dB).
- synth-commands (Speech-Commands-like, train/val/test, 0.5 s): three events, a low tone burst (L), a
  high tone burst (H) and a noise burst (N), 110-140 ms each, once per clip in roughly a third of the
  clip each (start jittered by up to ~120 ms), over faint background (SNR 25-40 dB); the class is their
  ORDER (6 classes), so the average spectrum carries no class information. 100 training clips per
  class: with 50 the small CPU models memorised the clips instead of learning the order.
- synth-speaker (speaker-ID-like, utterances stitched by the task into 1 s clips, 80/20 per speaker):
  six "speakers", each a glottal pulse train with its own pitch range, formant scale and breathiness,
  saying random vowel sequences through formant resonators.
(synth-concat is a task over synth-commands, see tasks.py.)

Every clip gets a random RMS level, and every clip of a dataset has the same length (speaker
utterances vary in length independently of the speaker), so loudness and length carry no class.
Clip i is generated from np.random.default_rng([SEED, dataset, i]): the data do not depend on the
task seed, which only drives task construction. Generation happens under a file lock in the data root,
so parallel trials calling open_task at once generate once; a finished dataset is not generated again.
"""

from __future__ import annotations

import json
import logging
from itertools import permutations
from pathlib import Path

import numpy as np
from filelock import FileLock

from .audio import SAMPLE_RATE, Decoded, to_pcm16
from .layouts import SourceClip
from .prepare import build, is_prepared

# scipy.signal is imported inside the generators that use it: a trial that only opens data generated
# earlier skips its ~2 s import

log = logging.getLogger(__name__)

SEED = 20240611
VERSION = 2  # bump when a generator changes: the fingerprint changes and old data are regenerated
SR = SAMPLE_RATE

TEXTURE_CLASSES = ["low-band", "high-band", "tremolo", "chirps", "buzz", "crackle"]
TEXTURE_CLIPS_PER_CLASS = 85  # 510 clips, 102 per fold
EVENTS = "LHN"  # low tone, high tone, noise burst
COMMAND_CLASSES = ["-".join(p) for p in permutations(EVENTS)]
COMMAND_SECONDS = 0.5  # short clips keep the raw frontend cheap on CPU (50 tokens; concat joins 2)
COMMAND_SPLIT = {"train": 100, "val": 10, "test": 30}  # clips per class
SPEAKERS = [  # (f0 Hz, formant scale, breathiness): pitch ranges nearly touch, formants disagree with pitch
    (100.0, 1.18, 0.05),
    (125.0, 0.86, 0.30),
    (150.0, 1.08, 0.12),
    (180.0, 0.94, 0.40),
    (215.0, 1.25, 0.20),
    (250.0, 0.80, 0.02),
]
UTTERANCES_PER_SPEAKER = 100
VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)]


def _band_noise(rng, n: int, lo: float, hi: float) -> np.ndarray:
    from scipy import signal

    sos = signal.butter(4, [lo, min(hi, 0.45 * SR)], btype="band", fs=SR, output="sos")
    return signal.sosfilt(sos, rng.standard_normal(n))


def _pink(rng, n: int) -> np.ndarray:
    from scipy import signal

    # white noise through a one-pole lowpass plus a little white: a cheap "pink-ish" background
    return signal.lfilter([1.0], [1.0, -0.95], rng.standard_normal(n)) * 0.3 + rng.standard_normal(n)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)) + 1e-12)


def _finish(rng, x: np.ndarray, snr_db: tuple[float, float]) -> Decoded:
    """Add background at a random SNR, then scale to a random RMS level (loudness carries no class)."""
    noise = _pink(rng, len(x))
    snr = rng.uniform(*snr_db)
    x = x / _rms(x) + noise / _rms(noise) * 10 ** (-snr / 20)
    x = x / _rms(x) * 10 ** (rng.uniform(-35.0, -18.0) / 20)  # random RMS level, -35..-18 dBFS
    x = x / max(1.0, np.max(np.abs(x)) / 0.99)  # the rare impulsive clip that would clip is scaled down
    pcm, clipped = to_pcm16(x.astype(np.float32))
    return Decoded(pcm, SR, 1, "SYNTHETIC", clipped)


def _texture(rng, cls: str, n: int) -> np.ndarray:
    from scipy import signal

    t = np.arange(n) / SR
    if cls == "low-band":
        fc = rng.uniform(250, 900)
        return _band_noise(rng, n, fc / 1.4, fc * 1.4)
    if cls == "high-band":
        fc = rng.uniform(1500, 5000)
        return _band_noise(rng, n, fc / 1.4, fc * 1.4)
    if cls == "tremolo":
        fc = rng.uniform(500, 3000)
        am = 1 + 0.9 * np.sin(2 * np.pi * rng.uniform(3, 15) * t + rng.uniform(0, 2 * np.pi))
        return _band_noise(rng, n, fc / 2, fc * 2) * am
    if cls == "chirps":
        x = np.zeros(n)
        rate, dur = rng.uniform(4, 10), rng.uniform(0.04, 0.08)
        f0, ratio = rng.uniform(500, 1500), rng.uniform(1.5, 3.0)
        m = int(dur * SR)
        tc = np.arange(m) / SR
        chirp = signal.chirp(tc, f0, dur, f0 * ratio) * np.hanning(m)
        for start in np.arange(rng.uniform(0, 1 / rate), n / SR, 1 / rate):
            a = int(start * SR)
            x[a : a + m] += chirp[: n - a]
        return x
    if cls == "buzz":
        f0 = rng.uniform(80, 300)
        k = np.arange(1, int(4000 // f0) + 1)
        phases = rng.uniform(0, 2 * np.pi, len(k))
        return np.sum(np.sin(2 * np.pi * f0 * k[:, None] * t + phases[:, None]) / k[:, None], axis=0)
    if cls == "crackle":
        clicks = (rng.random(n) < rng.uniform(15, 80) / SR) * rng.uniform(0.3, 1.0, n)
        click = np.exp(-np.arange(int(0.004 * SR)) / (0.0008 * SR))
        return _band_noise(rng, n, 1000, 3000) * 0.05 + signal.sosfilt(
            signal.butter(2, [800, 4000], btype="band", fs=SR, output="sos"), np.convolve(clicks, click)[:n]
        )
    raise ValueError(f"unknown texture class {cls!r}")


def _event(rng, kind: str, m: int) -> np.ndarray:
    t = np.arange(m) / SR
    if kind == "L":
        f = rng.uniform(350, 550)
        x = np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t)
    elif kind == "H":
        f = rng.uniform(1600, 2400)
        x = np.sin(2 * np.pi * f * t)
    else:
        x = _band_noise(rng, m, 3000, 6000) * 2.0
    ramp = min(int(0.01 * SR), m // 2)
    env = np.ones(m)
    env[:ramp] = np.linspace(0, 1, ramp)
    env[m - ramp :] = np.linspace(1, 0, ramp)
    return x * env * rng.uniform(0.5, 1.0)


def _command(rng, cls: str, n: int) -> np.ndarray:
    durs = rng.uniform(0.11, 0.14, 3)
    gaps = rng.uniform(0.02, 0.04, 2)
    span = durs.sum() + gaps.sum()
    start = rng.uniform(0.0, max(n / SR - span - 0.01, 0.0))  # at most ~120 ms: events keep rough thirds
    x = np.zeros(n)
    for kind, dur, gap in zip(cls.split("-"), durs, [*gaps, 0.0]):
        a, m = int(start * SR), int(dur * SR)
        x[a : a + m] += _event(rng, kind, m)
        start += dur + gap
    return x


def _resonator(x: np.ndarray, freq: float, bw: float) -> np.ndarray:
    from scipy import signal

    r = np.exp(-np.pi * bw / SR)
    a = [1.0, -2 * r * np.cos(2 * np.pi * freq / SR), r * r]
    return signal.lfilter([1 - r], a, x)


def _utterance(rng, speaker: int) -> np.ndarray:
    from scipy import signal

    f0_mean, scale, breath = SPEAKERS[speaker]
    pieces = []
    f0_utt = f0_mean * rng.uniform(0.9, 1.1)
    for s in range(rng.integers(2, 7)):
        m = int(rng.uniform(0.12, 0.3) * SR)
        decl = np.linspace(1.05, 0.95, m) * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(3, 6) * np.arange(m) / SR))
        phase = np.cumsum(f0_utt * decl / SR)
        pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal period
        source = signal.lfilter([1.0], [1.0, -1.9, 0.9025], pulses)  # glottal pulse shape, -12 dB/oct
        source = source / _rms(source) + breath * rng.standard_normal(m)
        f1, f2, f3 = (f * scale * rng.uniform(0.95, 1.05) for f in VOWELS[rng.integers(len(VOWELS))])
        voiced = sum(g * _resonator(source, f, bw) for f, bw, g in ((f1, 80, 1.0), (f2, 100, 0.6), (f3, 140, 0.3)))
        ramp = int(0.015 * SR)
        voiced[:ramp] *= np.linspace(0, 1, ramp)
        voiced[-ramp:] *= np.linspace(1, 0, ramp)
        pieces += [voiced / _rms(voiced), np.zeros(int(rng.uniform(0.02, 0.1) * SR))]
    return np.concatenate(pieces)


def _generate(job: tuple) -> Decoded:
    """One clip of a synthetic dataset; job = (dataset, index, class name or speaker index)."""
    name, index, what = job
    rng = np.random.default_rng([SEED, sum(map(ord, name)), index])
    if name == "synth-textures":
        return _finish(rng, _texture(rng, what, SR), (3.0, 18.0))
    if name == "synth-commands":
        return _finish(rng, _command(rng, what, int(COMMAND_SECONDS * SR)), (25.0, 40.0))
    if name == "synth-speaker":
        return _finish(rng, _utterance(rng, what), (10.0, 25.0))
    raise ValueError(f"unknown synthetic dataset {name!r}")


def _listing(name: str) -> tuple[list[str], list[SourceClip], list[tuple], float | None]:
    """(classes, clips, generator jobs, nominal clip seconds) of a synthetic dataset."""
    clips, jobs = [], []
    if name == "synth-textures":
        classes = TEXTURE_CLASSES
        for j in range(TEXTURE_CLIPS_PER_CLASS):
            for cls in classes:
                i = len(clips)
                clips.append(SourceClip(f"texture-{i:05d}", f"generated/{i}", cls, j % 5 + 1, "all", None))
                jobs.append((name, i, cls))
        return classes, clips, jobs, 1.0
    if name == "synth-commands":
        classes = COMMAND_CLASSES
        for split, per_class in COMMAND_SPLIT.items():
            for _ in range(per_class):
                for cls in classes:
                    i = len(clips)
                    clips.append(SourceClip(f"command-{i:05d}", f"generated/{i}", cls, None, split, None))
                    jobs.append((name, i, cls))
        return classes, clips, jobs, COMMAND_SECONDS
    if name == "synth-speaker":
        classes = [f"speaker-{k}" for k in range(len(SPEAKERS))]
        for k, spk in enumerate(classes):
            for u in range(UTTERANCES_PER_SPEAKER):
                i = len(clips)
                clips.append(SourceClip(f"{spk}-utt{u:04d}", f"generated/{i}", spk, None, "all", spk))
                jobs.append((name, i, k))
        return classes, clips, jobs, None
    raise ValueError(f"unknown synthetic dataset {name!r}")


def ensure_synthetic(root: str | Path, name: str) -> Path:
    """Generate synthetic dataset `name` into `<root>/<name>` unless it is already there; returns the folder."""
    root = Path(root)
    ddir = root / name
    fingerprint = f"synthetic:{name}:v{VERSION}:seed{SEED}"

    def done() -> bool:
        return is_prepared(ddir) and json.loads((ddir / "prepared.json").read_text())["fingerprint"] == fingerprint

    if done():
        return ddir
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if done():  # another process generated it while we waited
            return ddir
        log.info("generating synthetic dataset %s into %s", name, ddir)
        classes, clips, jobs, seconds = _listing(name)
        ddir.mkdir(exist_ok=True)
        build(
            ddir, name, classes, clips, _generate, jobs, fingerprint, [], clip_seconds=seconds,
            progress=False, extra={"synthetic": {"seed": SEED, "version": VERSION}},
        )  # fmt: skip
    return ddir
