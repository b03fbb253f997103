"""TV denoising written as OptNet's QP, the one copy in tasks/ (the reference solver and the qpth
peer of the TV benchmark take their QP data from here)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def tv_qp(y: Tensor, D: Tensor, lam: Tensor, eps: float = 0.0) -> dict[str, Tensor | None]:
    """QP data over ``z = [x; t]``: ``1/2 |x|^2 + eps/2 |t|^2 - y'x + lam 1't`` subject to
    ``D x - t <= 0`` and ``-D x - t <= 0`` (``A``, ``b`` None); ``y (B, n)``, ``D (m, n)``, a
    scalar ``lam``; float64, batched over ``B``."""
    B, n = y.shape
    m = D.shape[-2]
    f64 = torch.float64
    Q = torch.diag(torch.cat([torch.ones(n, dtype=f64), torch.full((m,), eps, dtype=f64)]))
    q = torch.cat([-y.to(f64), lam.to(f64).reshape(1, 1).expand(B, m)], -1)
    eye = torch.eye(m, dtype=f64)
    G = torch.cat([torch.cat([D, -eye], -1), torch.cat([-D, -eye], -1)], -2)
    return {
        "Q": Q.expand(B, -1, -1),
        "q": q,
        "G": G.expand(B, -1, -1),
        "h": y.new_zeros(B, 2 * m, dtype=f64),
        "A": None,
        "b": None,
    }
