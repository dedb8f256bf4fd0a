"""Parameter matching: every attention layer gets (nearly) the parameters of one BiMamba layer.

d_ffn = floor((P_mamba - P_MHA - P_norms) / (2D + 1)), P_MHA = 4D^2 + 4D, P_norms = 4D, where
P_mamba is counted on a real BiMambaBlock (built on the CPU, see `count_built`). The FFN
has 2*D*d_ffn + d_ffn + D parameters: the formula's 2D + 1 covers the weights and the hidden bias,
the floor drops up to 2D, and the output bias adds D, so the two layer types differ by at most D
(at D = 256: 1,056,512 vs 1,056,520).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from helix_sweep.models.blocks import BiMambaBlock
from helix_sweep.models.mamba import Mamba


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_built(make) -> int:
    """Parameters of the module `make()` builds: on the CPU, with the global RNG left as it was (so
    counting never changes a model initialised after it). Not on the meta device: its first use
    imports torch._dynamo, ~2 s of CPU in every process that counts (each trial's worker)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        return count_params(make())


@lru_cache(maxsize=None)
def mamba_params(d_model: int, d_state: int = 32, d_conv: int = 4, expand: int = 2) -> int:
    """One selective SSM mixer (mamba_ssm's Mamba parameterisation)."""
    return count_built(lambda: Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand))


@lru_cache(maxsize=None)
def bimamba_params(d_model: int, d_state: int = 32, d_conv: int = 4, expand: int = 2) -> int:
    return count_built(lambda: BiMambaBlock(d_model, d_state=d_state, d_conv=d_conv, expand=expand))


def matched_d_ffn(d_model: int, d_state: int = 32, d_conv: int = 4, expand: int = 2) -> int:
    p_mha = 4 * d_model**2 + 4 * d_model
    p_norms = 4 * d_model
    d_ffn = (bimamba_params(d_model, d_state, d_conv, expand) - p_mha - p_norms) // (2 * d_model + 1)
    if d_ffn < 1:
        raise ValueError(f"no positive d_ffn matches a BiMamba layer at d_model={d_model}, d_state={d_state}")
    return d_ffn
