"""The selective SSM mixer with exactly mamba_ssm's `Mamba` parameterisation.

Parameter names, shapes and initialisation follow mamba_ssm/modules/mamba_simple.py, so a
state_dict saved here loads into `mamba_ssm.modules.mamba_simple.Mamba` and back, and moves between
the scan implementations. `scan_impl` (auto | cuda | triton | pure) is resolved per device by
helix_sweep.models.scan.resolve_scan_impl. The fused `mamba_inner_fn` runs only when the scan
resolves to "cuda" and a probe shows mamba_inner_fn (which also needs causal-conv1d) really runs;
otherwise the conv1d and its silu run as `causal_conv1d_silu` (numba-compiled on CPU, PyTorch
elsewhere) and `selective_scan` with the resolved implementation.

Legend: B batch, L tokens, D d_model, E d_inner, N d_state, R dt_rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from helix_sweep.models.causal_conv import causal_conv1d_silu
from helix_sweep.models.scan import SCAN_IMPLS, mamba_mixer_status, resolve_scan_impl, selective_scan


class Mamba(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        use_fast_path: bool = True,
        scan_impl: str = "auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.use_fast_path = use_fast_path
        if scan_impl not in SCAN_IMPLS:
            raise ValueError(f"Mamba: scan_impl={scan_impl!r}, expected one of {', '.join(SCAN_IMPLS)}")
        self.scan_impl = scan_impl
        E, N, R = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        # dt_proj weight: uniform in +-R^-0.5 so the initial dt spread is set by the bias alone.
        nn.init.uniform_(self.dt_proj.weight, -(R**-0.5), R**-0.5)
        # dt bias: inverse softplus of dt drawn log-uniformly in [dt_min, dt_max], so that
        # softplus(bias) starts in that range (mamba_simple's "dt_init").
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        # A_log: S4D-real initialisation, A = -(1..N) for every channel.
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)  # (E, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        # D: skip connection, starts as identity.
        self.D = nn.Parameter(torch.ones(E))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(E, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        xz = self.in_proj(x)  # (B, L, 2E)
        A = -torch.exp(self.A_log.float())  # (E, N)
        impl = resolve_scan_impl(self.scan_impl, xz.device)  # cached per process and device
        if impl == "cuda" and self.use_fast_path and mamba_mixer_status(xz.device)[0]:
            from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

            return mamba_inner_fn(
                xz.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                self.dt_proj.weight, self.out_proj.weight, None, A, None, None,
                self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            )  # (B, L, D)
        # (B, E, L) views of (B, L, E) memory: their gradients, in that layout too, join without a copy
        u, z = (half.transpose(1, 2) for half in xz.chunk(2, dim=-1))
        u = causal_conv1d_silu(u, self.conv1d.weight, self.conv1d.bias)  # (B, E, L)
        x_dbl = self.x_proj(u.transpose(1, 2))  # (B, L, R + 2N)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, E, L), bias added in the scan
        y = selective_scan(
            u, delta, A, Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous(),
            self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True, impl=impl,
        )  # (B, E, L)
        return self.out_proj(y.transpose(1, 2))  # (B, L, D)
