"""The mixer's causal depthwise conv1d + silu: the numba kernels against PyTorch's conv1d and silu."""

import pytest
import torch
import torch.nn.functional as F

from helix_sweep.models import Mamba, causal_conv
from helix_sweep.models.causal_conv import causal_conv1d_silu


def torch_conv_silu(x, weight, bias):
    return F.silu(F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., :x.shape[-1]])


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("batch,dim,length,width", [(2, 6, 9, 4), (3, 5, 2, 4), (2, 4, 7, 1), (4, 16, 50, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "mixer"])
def test_numba_conv_matches_torch_with_gradients(batch, dim, length, width, layout):
    g = torch.Generator().manual_seed(length)
    if layout == "mixer":  # u as the mixer has it: half of in_proj's (B, L, 2E) output, viewed (B, E, L)
        x = torch.randn(batch, length, 2 * dim, generator=g, dtype=torch.float64).transpose(1, 2)[:, :dim]
    else:
        x = torch.randn(batch, dim, length, generator=g, dtype=torch.float64)
    weight = torch.randn(dim, 1, width, generator=g, dtype=torch.float64)
    bias = torch.randn(dim, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, dim, length, generator=g, dtype=torch.float64)
    exact = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    ref = torch_conv_silu(*exact)
    ref.backward(dout)
    ours = [t.detach().float().requires_grad_(True) for t in (x, weight, bias)]
    out = causal_conv1d_silu(*ours)
    out.backward(dout.float())
    assert out.shape == (batch, dim, length) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-6
    for mine, theirs in zip(ours, exact):
        assert mine.grad.shape == theirs.shape
        assert rel_err(mine.grad, theirs.grad) <= 1e-5


def test_mixer_gives_the_same_numbers_with_and_without_the_kernels(monkeypatch):
    torch.manual_seed(0)
    mixer = Mamba(16, d_state=4)
    x = torch.randn(3, 20, 16)
    out = mixer(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    mixer.zero_grad()
    monkeypatch.setattr(causal_conv, "conv_numba_runs", lambda: False)  # PyTorch's conv1d and silu
    plain = mixer(x)
    plain.square().sum().backward()
    assert rel_err(out, plain.detach().double()) <= 1e-6
    for n, p in mixer.named_parameters():
        assert rel_err(grads[n], p.grad.double()) <= 1e-5, n


def test_non_finite_values_propagate():
    x = torch.randn(2, 4, 10)
    x[1, 2, 3] = float("nan")
    weight, bias = torch.randn(4, 1, 4, requires_grad=True), torch.randn(4)
    out = causal_conv1d_silu(x, weight, bias)
    assert out[1, 2, 3:7].isnan().all() and not out[0].isnan().any()  # a causal window of 4
    out.sum().backward()
    assert weight.grad[2].isnan().any()
