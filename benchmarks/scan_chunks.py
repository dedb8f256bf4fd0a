"""GPU: time the pure scan's parallel mode at several chunk lengths (fwd+bwd), to pick the default.

`python benchmarks/scan_chunks.py` on a CUDA machine; prints ms per (batch, L, chunk).
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helix_sweep.models.scan import selective_scan_pure  # noqa: E402


def main() -> int:
    dev = torch.device("cuda")
    E, N = 512, 32
    for batch, L in ((8, 500), (4, 3000), (1, 30000)):
        g = torch.Generator(device=dev).manual_seed(0)
        args = [torch.randn(batch, E, L, device=dev, generator=g).requires_grad_(),
                (torch.rand(batch, E, L, device=dev, generator=g) * 0.1).requires_grad_(),
                (-torch.rand(E, N, device=dev, generator=g) - 0.5).requires_grad_(),
                torch.randn(batch, N, L, device=dev, generator=g).requires_grad_(),
                torch.randn(batch, N, L, device=dev, generator=g).requires_grad_()]
        row = []
        for chunk in (16, 32, 64, 128, 256, 512, None):
            def step():
                selective_scan_pure(*args, delta_softplus=True, mode="parallel", chunk_size=chunk).sum().backward()
            step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            row.append(f"T={chunk or 'default'}: {(time.perf_counter() - t0) / 3 * 1000:.1f} ms")
        print(f"B={batch} L={L}: " + ", ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
