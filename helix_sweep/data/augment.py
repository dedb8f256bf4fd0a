"""Training-split augmentation from the study's protocol, on batches of waveforms.

circular time shift within +-time_shift_s, gain drawn from [gain_min, gain_max], Gaussian noise with
sigma noise_std, mixup with Beta(mixup_alpha, mixup_alpha). Each one can be switched off; the
settings are train.augment (helix_sweep.config.AugmentSettings).

All randomness comes from the torch.Generator passed in (the training loop checkpoints its state, so
a resumed run draws exactly the same augmentations). Draws happen on the generator's device and are
moved to the batch's device.
"""

from __future__ import annotations

import numpy as np
import torch

from helix_sweep.config import AugmentSettings


def augment_batch(x: torch.Tensor, cfg: AugmentSettings, generator: torch.Generator, sample_rate: int = 16000) -> torch.Tensor:
    """Shift, gain and noise of a (B, T) batch; returns a new (B, T) tensor."""
    B, T = x.shape
    dev = generator.device
    if cfg.shift and cfg.time_shift_s > 0:
        max_shift = min(int(round(cfg.time_shift_s * sample_rate)), T - 1)
        shift = torch.randint(-max_shift, max_shift + 1, (B, 1), generator=generator, device=dev).to(x.device)
        index = (torch.arange(T, device=x.device)[None, :] - shift) % T  # (B, T): out[t] = x[t - shift]
        x = torch.gather(x, 1, index)
    if cfg.gain:
        lo, hi = cfg.gain_min, cfg.gain_max
        gain = torch.rand((B, 1), generator=generator, device=dev).to(x.device) * (hi - lo) + lo
        x = x * gain
    if cfg.noise and cfg.noise_std > 0:
        noise = torch.randn((B, T), generator=generator, device=dev).to(x.device, x.dtype)
        x = x + cfg.noise_std * noise
    return x


def mixup(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each example with a random partner: (x (B, T), y (B,)) -> (x_mixed (B, T), y_soft (B, C)).

    One weight lam ~ Beta(alpha, alpha) per batch (the original recipe). torch's Beta sampler takes no
    generator, so lam comes from a numpy Generator seeded by a draw from `generator`.
    """
    y_hot = torch.nn.functional.one_hot(y, num_classes).to(x.dtype)  # (B, C)
    if alpha <= 0:
        return x, y_hot
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator, device=generator.device).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y_hot + (1 - lam) * y_hot[perm]


def augment_and_mix(
    x: torch.Tensor, y: torch.Tensor, cfg: AugmentSettings, num_classes: int, generator: torch.Generator, sample_rate: int = 16000
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training-split pipeline: augment_batch then mixup (if enabled); y comes back soft (B, C)."""
    x = augment_batch(x, cfg, generator, sample_rate)
    if cfg.mixup:
        return mixup(x, y, num_classes, cfg.mixup_alpha, generator)
    return x, torch.nn.functional.one_hot(y, num_classes).to(x.dtype)
