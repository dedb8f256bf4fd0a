"""Augmentation: the protocol's magnitudes, switches, and randomness only from the given generator."""

import numpy as np
import pytest
import torch

from helix_sweep.config import AugmentSettings
from helix_sweep.data.augment import augment_and_mix, augment_batch, mixup

OFF = dict(shift=False, gain=False, noise=False, mixup=False)


def batch(B=8, T=16000):
    return torch.randn(B, T, generator=torch.Generator().manual_seed(0)) * 0.1


def test_defaults_follow_the_protocol():
    cfg = AugmentSettings()
    assert (cfg.time_shift_s, (cfg.gain_min, cfg.gain_max), cfg.noise_std, cfg.mixup_alpha) == (0.5, (0.8, 1.2), 0.005, 0.3)
    assert cfg.shift and cfg.gain and cfg.noise and cfg.mixup


def test_all_off_is_identity():
    x = batch()
    assert torch.equal(augment_batch(x, AugmentSettings(**OFF), torch.Generator().manual_seed(1)), x)


def test_shift_is_circular_and_bounded():
    T = 16000
    x = torch.arange(T, dtype=torch.float32).repeat(64, 1)  # a ramp: the first sample names the shift
    y = augment_batch(x, AugmentSettings(**{**OFF, "shift": True}), torch.Generator().manual_seed(2))
    shifts = [int((-row[0].item()) % T) for row in y]
    shifts = [s - T if s > T // 2 else s for s in shifts]
    for row, s in zip(y, shifts):
        assert torch.equal(row, torch.roll(x[0], s))
    assert max(abs(s) for s in shifts) <= 8000 and len(set(shifts)) > 50
    assert min(shifts) < -4000 and max(shifts) > 4000


def test_gain_range_and_noise_sigma():
    x = batch(B=256, T=4000)
    g = augment_batch(x, AugmentSettings(**{**OFF, "gain": True}), torch.Generator().manual_seed(3))
    ratio = (g / x)[:, 0]
    assert ratio.min() >= 0.8 and ratio.max() <= 1.2 and ratio.max() - ratio.min() > 0.35
    assert torch.allclose(g / x, ratio[:, None].expand_as(g), atol=1e-5)  # one gain per clip
    n = augment_batch(x, AugmentSettings(**{**OFF, "noise": True}), torch.Generator().manual_seed(4)) - x
    assert abs(n.std().item() - 0.005) < 1e-4 and abs(n.mean().item()) < 1e-4


def test_same_generator_state_gives_same_draws():
    x = batch()
    gen = torch.Generator().manual_seed(5)
    gen.manual_seed(5)
    saved = gen.get_state()
    a = augment_and_mix(x, torch.arange(8) % 3, AugmentSettings(), 3, gen)
    b_first = augment_and_mix(x, torch.arange(8) % 3, AugmentSettings(), 3, gen)
    gen.set_state(saved)  # what a resume from a checkpoint does
    b = augment_and_mix(x, torch.arange(8) % 3, AugmentSettings(), 3, gen)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], b_first[0])
    # global RNGs are not touched
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    augment_and_mix(x, torch.arange(8) % 3, AugmentSettings(), 3, torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(1), before)


def test_mixup_soft_labels():
    x = batch(B=16, T=100)
    y = torch.arange(16) % 4
    gen = torch.Generator().manual_seed(6)
    lams = []
    for _ in range(300):
        xm, ys = mixup(x, y, 4, 0.3, gen)
        assert ys.shape == (16, 4) and torch.allclose(ys.sum(1), torch.ones(16))
        lams.append(ys[torch.arange(16), y].min().item())
    lam = np.array(lams)
    # Beta(0.3, 0.3) is U-shaped: most weights near 0 or 1, mean 0.5 by symmetry of the pair
    assert (np.minimum(lam, 1 - lam) < 0.1).mean() > 0.4
    xm0, ys0 = mixup(x, y, 4, 0.0, gen)
    assert torch.equal(xm0, x) and torch.equal(ys0, torch.nn.functional.one_hot(y, 4).float())


def test_mixup_mixes_inputs_and_labels_with_the_same_weight():
    x = torch.eye(4)  # each row identifies its example
    y = torch.arange(4)
    xm, ys = mixup(x, y, 4, 0.3, torch.Generator().manual_seed(7))
    assert torch.allclose(xm, ys)  # x_i = onehot(i) and y_i = i, so the mixes must coincide


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_generator_with_gpu_batch():
    x = batch().cuda()
    out = augment_batch(x, AugmentSettings(), torch.Generator().manual_seed(1))
    assert out.device == x.device
