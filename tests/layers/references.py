"""Independent references and inputs shared by the library tests: plain implementations that
share no code with ``layers`` (pool-adjacent-violators in numpy, bisection for the capped simplex,
permutations from ``argsort``), and reproducible test signals."""

from __future__ import annotations

import math

import numpy as np
import torch

F64 = torch.float64


def pav_nonincreasing(y: np.ndarray) -> np.ndarray:
    """Isotonic regression ``argmin_{v_1 >= ... >= v_n} |v - y|^2`` by pool-adjacent-violators."""
    sums: list[float] = []
    counts: list[int] = []
    for yi in y:
        sums.append(float(yi))
        counts.append(1)
        while len(sums) > 1 and sums[-2] / counts[-2] < sums[-1] / counts[-1]:
            s, c = sums.pop(), counts.pop()
            sums[-1] += s
            counts[-1] += c
    return np.concatenate([np.full(c, s / c) for s, c in zip(sums, counts)])


def project_permutahedron(z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``z`` onto the permutahedron of ``w`` (Blondel et al., Prop. 3)."""
    order = np.argsort(-z, kind="stable")
    s = z[order]
    mu = np.empty_like(z)
    mu[order] = s - pav_nonincreasing(s - np.sort(w)[::-1])
    return mu


def capped_simplex(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection of ``z`` onto ``{0 <= y <= 1, sum y = k}`` by bisection, and its Jacobian."""
    lo = z.min(-1, keepdim=True).values - 1
    hi = z.max(-1, keepdim=True).values
    for _ in range(200):
        mid = (lo + hi) / 2
        above = (z - mid).clamp(0, 1).sum(-1, keepdim=True) > k
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    y = (z - (lo + hi) / 2).clamp(0, 1)
    free = ((y > 1e-9) & (y < 1 - 1e-9)).to(z.dtype)
    J = (
        torch.diag_embed(free)
        - free[..., :, None]
        * free[..., None, :]
        / free.sum(-1, keepdim=True).clamp_min(1)[..., None]
    )
    return y, J


def perm_matrix(scores: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return torch.nn.functional.one_hot(order, scores.shape[-1]).to(scores.dtype)


def topk_indicator(scores: torch.Tensor, k: int) -> torch.Tensor:
    return perm_matrix(scores)[..., :k, :].sum(-2)


def distinct(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Scores with gaps >= 0.5 between any two items of a row (well-separated limits)."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    base = torch.arange(n, dtype=dtype) * 0.5 + 0.1 * torch.rand(n, generator=g, dtype=dtype)
    idx = torch.stack([torch.randperm(n, generator=g) for _ in range(math.prod(shape[:-1]))])
    return base[idx].reshape(shape)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def signals(B: int, n: int, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant signals plus noise, float64."""
    g = gen(seed)
    clean = torch.repeat_interleave(
        torch.randint(0, 10, (B, 4), generator=g).double(), n // 4 + 1, dim=1
    )[:, :n]
    return clean + 0.8 * torch.randn(B, n, generator=g, dtype=F64)
