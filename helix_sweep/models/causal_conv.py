"""The Mamba mixer's causal depthwise conv1d followed by silu: `causal_conv1d_silu`, same contract as
causal_conv1d's `causal_conv1d_fn(x, weight, bias, activation="silu")`.

On CPU where numba imports: one compiled pass forward and one backward (helix_sweep.models.mixer_numba),
the output laid out (B, L, E) under its (B, E, L) shape, as the mixer's next linear layer reads it.
Elsewhere (a GPU without mamba_ssm's fused mixer, or no numba): PyTorch's conv1d and silu. Both give
the same numbers with the same parameters (the mixer's nn.Conv1d weight and bias).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(bias + causal depthwise conv of x): x (B, E, L), weight (E, 1, K), bias (E,) -> (B, E, L)."""
    if x.device.type == "cpu" and conv_numba_runs():
        return _CausalConvSilu.apply(x, weight, bias)
    return F.silu(F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., :x.shape[-1]])


@functools.cache
def conv_numba_runs() -> bool:
    try:
        import helix_sweep.models.mixer_numba  # noqa: F401
    except Exception:  # numba missing or broken: PyTorch's conv (scan_pure.scan_numba_status says why)
        return False
    return True


class _CausalConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        from helix_sweep.models.mixer_numba import conv_silu_forward

        batch, dim, length = x.shape
        out = torch.empty(batch, length, dim, dtype=torch.float32)
        conv_silu_forward(_np(x), _np(weight.view(dim, -1)), _np(bias), out.numpy())
        ctx.save_for_backward(x, weight, bias)
        return out.transpose(1, 2).to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        from helix_sweep.models.mixer_numba import conv_silu_backward

        x, weight, bias = ctx.saved_tensors
        batch, dim, length = x.shape
        dx = torch.empty(batch, length, dim, dtype=torch.float32).transpose(1, 2)  # the mixer's (B, L, E) layout
        dw = torch.zeros(dim, weight.shape[-1], dtype=torch.float32)
        dbias = torch.zeros(dim, dtype=torch.float32)
        conv_silu_backward(_np(x), _np(weight.view(dim, -1)), _np(bias), _np(dout), dx.numpy(), dw.numpy(),
                           dbias.numpy())
        return dx.to(x.dtype), dw.view_as(weight).to(weight.dtype), dbias.to(bias.dtype)


def _np(t: torch.Tensor):
    return t.detach().float().numpy()
