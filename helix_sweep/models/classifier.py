"""The HELIX classifier: frontend -> N layers in a pattern of BiMamba (M) and attention (A) -> head.

Legend: B batch, T samples, L tokens, D d_model, C classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from functools import lru_cache

import torch
import torch.nn as nn

from helix_sweep.config import ModelConfig
from helix_sweep.models.blocks import AttentionBlock, BiMambaBlock
from helix_sweep.models.frontends import FRONTENDS
from helix_sweep.models.matching import count_built, count_params, matched_d_ffn


class HelixClassifier(nn.Module):
    def __init__(self, pattern: str, frontend: str, num_classes: int, *, d_model: int = 256,
                 pool_tokens: int | None = None, d_state: int = 32, d_conv: int = 4, expand: int = 2,
                 num_heads: int = 4, attention_impl: str = "sdpa", pos_encoding: str = "sinusoidal",
                 frontend_options: dict | None = None, scan_impl: str = "auto"):
        super().__init__()
        bad = set(pattern) - {"M", "A"}
        if not pattern or bad:
            raise ValueError(f"layer pattern {pattern!r}: use only 'M' (BiMamba) and 'A' (attention), e.g. 'MMMAMM'")
        if frontend not in FRONTENDS:
            raise ValueError(f"frontend {frontend!r}: expected one of {sorted(FRONTENDS)}")
        if pool_tokens is not None and pool_tokens < 1:
            raise ValueError(f"pool_tokens={pool_tokens}: must be a positive token count or None (all)")
        if pos_encoding not in ("sinusoidal", "none"):
            raise ValueError(f"pos_encoding={pos_encoding!r}: expected 'sinusoidal' or 'none'")
        self.pattern, self.frontend_name, self.pool_tokens = pattern, frontend, pool_tokens
        self.pos_encoding = pos_encoding
        self.d_ffn = matched_d_ffn(d_model, d_state, d_conv, expand)
        self.frontend = FRONTENDS[frontend](d_model, **(frontend_options or {}))
        self.layers = nn.ModuleList(
            BiMambaBlock(d_model, d_state, d_conv, expand, scan_impl) if kind == "M"
            else AttentionBlock(d_model, self.d_ffn, num_heads, attention_impl)
            for kind in pattern
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def num_tokens(self, num_samples: int) -> int:
        return self.frontend.num_tokens(num_samples)

    def backbone(self, wav: torch.Tensor) -> torch.Tensor:
        x = self.frontend(wav)  # (B, L, D)
        if self.pos_encoding == "sinusoidal":
            x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)  # (B, L, D)
        for layer in self.layers:
            x = layer(x)  # (B, L, D)
        return x

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Head on backbone outputs: LN, mean over the first K tokens, linear."""
        x = self.norm(x[:, : self.pool_tokens])  # (B, K, D); K = all when pool_tokens is None
        return self.head(x.mean(dim=1))  # (B, C)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.classify(self.backbone(wav))  # (B, T) -> (B, C)

    def param_report(self) -> dict:
        return {
            "total": count_params(self),
            "frontend": count_params(self.frontend),
            "layers": [count_params(layer) for layer in self.layers],
            "head": count_params(self.norm) + count_params(self.head),
            "d_ffn": self.d_ffn,
        }


def sinusoidal_positions(length: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed sine/cosine positions (L, D). Parameter-free, so the matching is untouched.

    The spec names no positional encoding; without one, pure attention with mean pooling is
    blind to token order (it cannot tell "up-down" from "down-up"). All variants get the same
    encoding so they stay comparable; model.pos_encoding=none gives the literal spec.
    """
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype)  # (L, D)


def build_classifier(pattern: str, frontend: str, num_classes: int, *, d_model: int = 256,
                     pool_tokens: int | None = None, **overrides) -> HelixClassifier:
    """Any layer pattern ('MMMMMM', 'MMMAMM', 'AAAAAA', 'AMMMMM', ...) with a 'raw' or 'mel' frontend.

    overrides: d_state, d_conv, expand, num_heads, attention_impl, pos_encoding, frontend_options,
    scan_impl (auto | cuda | triton | pure, see helix_sweep.models.scan.resolve_scan_impl).
    """
    return HelixClassifier(pattern, frontend, num_classes, d_model=d_model, pool_tokens=pool_tokens, **overrides)


def build_classifier_from(model: ModelConfig, pattern: str, frontend: str, num_classes: int,
                          pool_tokens: int | None = None) -> HelixClassifier:
    """A trial's classifier in one call: its variant (pattern, frontend), its task's classes and
    pooling, and every architecture setting of its model section (d_model, d_state, ...)."""
    return HelixClassifier(pattern, frontend, num_classes, pool_tokens=pool_tokens, **asdict(model))


@lru_cache(maxsize=None)
def classifier_params(pattern: str, frontend: str, num_classes: int, d_model: int = 256, d_state: int = 32,
                      d_conv: int = 4, expand: int = 2) -> int:
    """Parameters of build_classifier(pattern, frontend, num_classes, ...), counted on a CPU build that
    leaves the global RNG as it was (matching.count_built). The count does not depend on num_heads,
    attention_impl or pooling."""
    return count_built(lambda: HelixClassifier(pattern, frontend, num_classes, d_model=d_model, d_state=d_state,
                                               d_conv=d_conv, expand=expand))
