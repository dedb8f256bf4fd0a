"""The two layer types of the HELIX backbone. Both map (B, L, D) -> (B, L, D).

Legend: B batch, L tokens, D d_model, H heads, Dh head width, F d_ffn.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from helix_sweep.models.mamba import Mamba


class BiMambaBlock(nn.Module):
    """H = LN(X); X' = X + Wout [MambaF(H) ; flip(MambaB(flip(H)))].

    The two mixers share no weights; the backward one reads the sequence reversed, so every
    output position sees the whole clip.
    """

    def __init__(self, d_model: int, d_state: int = 32, d_conv: int = 4, expand: int = 2,
                 scan_impl: str = "auto"):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mamba_fwd = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, scan_impl=scan_impl)
        self.mamba_bwd = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, scan_impl=scan_impl)
        self.out = nn.Linear(2 * d_model, d_model)  # Wout: 2D -> D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # (B, L, D)
        y_f = self.mamba_fwd(h)  # (B, L, D)
        y_b = self.mamba_bwd(h.flip(1)).flip(1)  # (B, L, D), read right to left
        return x + self.out(torch.cat([y_f, y_b], dim=-1))  # (B, L, 2D) -> (B, L, D)


class SelfAttention(nn.Module):
    """Multi-head self-attention, 4D^2 + 4D parameters (fused qkv + output projection, with biases).

    impl="sdpa" uses torch's scaled_dot_product_attention (flash / memory-efficient kernels);
    impl="naive" materialises the (L, L) weights as the study's setup did, which is what makes
    pure attention run out of memory at 30,000 tokens.
    """

    def __init__(self, d_model: int, num_heads: int = 4, impl: str = "sdpa"):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        if impl not in ("sdpa", "naive"):
            raise ValueError(f"attention_impl={impl!r}: expected 'sdpa' or 'naive'")
        self.num_heads = num_heads
        self.impl = impl
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bsz, L, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(Bsz, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, Dh)
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh)
        else:
            w = (q @ k.transpose(-2, -1)) / math.sqrt(D // H)  # (B, H, L, L)
            y = w.softmax(dim=-1) @ v  # (B, H, L, Dh)
        y = y.transpose(1, 2).reshape(Bsz, L, D)  # (B, L, D)
        return self.proj(y)


class AttentionBlock(nn.Module):
    """Pre-norm Transformer layer: A = X + MHA(LN(X)); X' = A + FFN(LN(A))."""

    def __init__(self, d_model: int, d_ffn: int, num_heads: int = 4, attention_impl: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, num_heads, attention_impl)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ffn), nn.GELU(), nn.Linear(d_ffn, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, L, D)
        return x + self.ffn(self.norm2(x))  # (B, L, D)
