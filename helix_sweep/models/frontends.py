"""Frontends: a (B, T) waveform at 16 kHz -> (B, L, D) tokens.

Every clip in a batch has the same length T (the data layer pads or crops each clip to the
task's clip length), so no padding masks are needed here.

Legend: B batch, T samples, L tokens, D d_model, M mel bins, F frames.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchaudio

# The study's frontend geometry at 16 kHz: the single source of tokens per clip (also for the cost
# model, helix_sweep.training.budget).
SAMPLE_RATE = 16_000  # every clip is mono audio at 16 kHz
RAW_PATCH = 160  # samples per raw token (Conv1d kernel = stride)
MEL_HOP, MEL_BINS, MEL_PATCH = 512, 128, 16  # STFT hop, mel bins, square patch of the Conv2d


class RawFrontend(nn.Module):
    """Conv1d(1 -> D, kernel = stride = 160) then LayerNorm: 100 tokens per second at 16 kHz."""

    def __init__(self, d_model: int, patch: int = RAW_PATCH):
        super().__init__()
        self.patch = patch
        self.conv = nn.Conv1d(1, d_model, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(d_model)

    def num_tokens(self, num_samples: int) -> int:
        return num_samples // self.patch

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.shape[-1] < self.patch:
            raise ValueError(
                f"raw frontend: clip of {wav.shape[-1]} samples is shorter than one patch "
                f"({self.patch} samples = {self.patch / 16000 * 1000:.0f} ms at 16 kHz)"
            )
        x = self.conv(wav.unsqueeze(1))  # (B, D, L)
        return self.norm(x.transpose(1, 2))  # (B, L, D)


class MelFrontend(nn.Module):
    """128-bin log-mel (n_fft 1024, hop 512) as a 1 x M x F image, Conv2d(1 -> D, 16x16, stride 16).

    Tokens are ordered time-major (all frequency patches of time patch 0, then of time patch 1, ...)
    so that the sequence runs forward in time like the raw one and "first K tokens" means the
    start of the clip: L = (M / 16) * floor(F / 16).
    """

    def __init__(self, d_model: int, sample_rate: int = SAMPLE_RATE, n_fft: int = 1024, hop: int = MEL_HOP,
                 n_mels: int = MEL_BINS, patch: int = MEL_PATCH):
        super().__init__()
        if n_mels % patch:
            raise ValueError(f"n_mels={n_mels} must be a multiple of the patch size {patch}")
        self.n_fft, self.hop, self.n_mels, self.patch = n_fft, hop, n_mels, patch
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels
        )
        self.conv = nn.Conv2d(1, d_model, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(d_model)

    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop  # torchaudio pads by n_fft // 2 on both sides (center=True)

    def num_tokens(self, num_samples: int) -> int:
        return (self.n_mels // self.patch) * (self.num_frames(num_samples) // self.patch)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        frames = self.num_frames(wav.shape[-1])
        if frames < self.patch:
            min_samples = (self.patch - 1) * self.hop
            raise ValueError(
                f"mel frontend: clip of {wav.shape[-1]} samples gives {frames} frames, fewer than one "
                f"{self.patch}-frame patch (needs >= {min_samples} samples = {min_samples / 16000:.2f} s)"
            )
        with torch.autocast(device_type=wav.device.type, enabled=False):
            spec = self.mel(wav.float())  # (B, M, F), in fp32: power spectra overflow fp16
            spec = torch.log(spec + 1e-6).unsqueeze(1)  # (B, 1, M, F)
        x = self.conv(spec)  # (B, D, M/16, F/16)
        x = x.permute(0, 3, 2, 1).flatten(1, 2)  # (B, F/16 * M/16, D), time-major
        return self.norm(x)  # (B, L, D)


FRONTENDS = {"raw": RawFrontend, "mel": MelFrontend}


def num_tokens(frontend: str, num_samples: int) -> int:
    """Tokens per clip of a frontend at its default settings, without building it."""
    if frontend == "raw":
        return num_samples // RAW_PATCH
    if frontend == "mel":
        return (MEL_BINS // MEL_PATCH) * ((1 + num_samples // MEL_HOP) // MEL_PATCH)
    raise ValueError(f"frontend {frontend!r}: expected one of {sorted(FRONTENDS)}")


def first_clip_tokens(frontend: str, clip_seconds: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Tokens the first clip of a joined example covers on a frontend: the head's K for "label of the
    first clip" tasks. Raw: 100 per second (1 s -> 100). Mel: its time-major patches that fall within
    the clip (1 s -> 32 frames -> 2 time patches x 8 frequency patches = 16). Tokens run forward in
    time on both frontends, so the first K tokens are the start of the example."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"sample_rate={sample_rate}: the frontends take {SAMPLE_RATE} Hz audio")
    return num_tokens(frontend, int(round(clip_seconds * sample_rate)))


def patch_inputs(frontend: str) -> int:
    """Input values one token's patch convolution reads: 160 samples (raw), 16 x 16 mel bins (mel)."""
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend {frontend!r}: expected one of {sorted(FRONTENDS)}")
    return RAW_PATCH if frontend == "raw" else MEL_PATCH * MEL_PATCH
