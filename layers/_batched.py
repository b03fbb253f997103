"""Batched linear algebra shared by the solvers, the step to the boundary, and thread control.

Inside the QP solver vectors are columns ``(B, k, 1)`` and per-element scalars ``(B, 1, 1)``, so
every matrix-vector product is a single ``bmm``; the TV solver keeps vectors as rows ``(B, k)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "ONE_THREAD_SIZE",
    "Cholesky",
    "add_diag",
    "amax",
    "chol_solve",
    "dot",
    "max_step",
    "one_thread",
    "threads_for",
]

ONE_THREAD_SIZE = 1 << 18  # B (n + p)^2 up to which a CPU solve runs on one torch thread


def amax(v: Tensor) -> Tensor:
    """Max-abs over dim -2 of ``(B, k, 1)``, kept as ``(B, 1, 1)``; 0 for ``k == 0``."""
    if v.shape[-2] == 0:
        return v.new_zeros(v.shape[0], 1, 1)
    return v.abs().amax(-2, keepdim=True)


def dot(u: Tensor, v: Tensor) -> Tensor:
    """Column dot product ``(B, k, 1), (B, k, 1) -> (B, 1, 1)``."""
    return (u * v).sum(-2, keepdim=True)


def add_diag(M: Tensor, d: Tensor) -> Tensor:
    """``M + diag(d)`` for ``M (B, k, k)`` and ``d (B, 1, 1)`` (a new tensor)."""
    out = M.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(d.squeeze(-1))
    return out


def chol_solve(L: Tensor, r: Tensor) -> Tensor:
    """``(L L')^{-1} r`` for ``L (B, k, k)`` lower triangular and a row ``r (B, k)``."""
    t = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(L.mT, t, upper=True).squeeze(-1)


_BLOCK = 64  # matrices up to this size are factorized by one LAPACK call


class Cholesky:
    """Batched Cholesky factorization ``M = L L'`` of ``M (B, k, k)``, by 2 x 2 blocks above
    ``_BLOCK`` rows, and solves with it.

    On CPU, ``torch.linalg.cholesky_ex`` spends more time zeroing the upper triangle of its
    column-major result than in LAPACK for k = 128; factorizing the two diagonal blocks
    (recursively) and the Schur complement update with ``baddbmm`` halves the cost. ``info``
    is ``(B,)``, nonzero where ``M`` is not (numerically) positive definite.
    """

    def __init__(self, M: Tensor):
        k = M.shape[-1]
        if k <= _BLOCK:
            self.L, self.info = torch.linalg.cholesky_ex(M)
            self.parts = None
            return
        h = k // 2
        top = Cholesky(M[:, :h, :h])
        L21 = top.solve_lower(M[:, h:, :h].mT).mT
        bottom = Cholesky(torch.baddbmm(M[:, h:, h:], L21, L21.mT, alpha=-1))
        self.parts = (h, top, L21, bottom)
        self.info = top.info | bottom.info

    def solve_lower(self, r: Tensor) -> Tensor:
        """``L^{-1} r`` for columns ``r (B, k, c)``."""
        if self.parts is None:
            return torch.linalg.solve_triangular(self.L, r, upper=False)
        h, top, L21, bottom = self.parts
        y1 = top.solve_lower(r[:, :h])
        return torch.cat([y1, bottom.solve_lower(r[:, h:] - torch.bmm(L21, y1))], 1)

    def solve_upper(self, r: Tensor) -> Tensor:
        """``L'^{-1} r`` for columns ``r (B, k, c)``."""
        if self.parts is None:
            return torch.linalg.solve_triangular(self.L.mT, r, upper=True)
        h, top, L21, bottom = self.parts
        x2 = bottom.solve_upper(r[:, h:])
        return torch.cat([top.solve_upper(r[:, :h] - torch.bmm(L21.mT, x2)), x2], 1)

    def solve(self, r: Tensor) -> Tensor:
        """``M^{-1} r`` for columns ``r (B, k, c)``."""
        return self.solve_upper(self.solve_lower(r))


def max_step(v: Tensor, dv: Tensor, *, dim: int = -2, cap: float = 1e30) -> Tensor:
    """Largest ``a`` with ``v + a dv >= 0``, the minimum over ``dim`` (kept, size 1) of
    ``-v_i / dv_i`` for the entries with ``dv_i < 0``.

    Entries with ``dv_i >= 0`` never reach the boundary and count as ``cap`` (``1e30`` or
    ``math.inf``), so the result is ``cap`` when no entry decreases. A NaN in ``dv`` propagates
    to the step: callers treat a non-finite step as a failed one, and clamp the result to 1.

    The QP solver uses columns ``(B, k, 1)``, ``dim=-2``, ``cap=1e30``; the TV solver rows
    ``(B, k)``, ``dim=-1``, ``cap=math.inf``.
    """
    return (-v / dv).masked_fill_(dv >= 0, cap).amin(dim, keepdim=True)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch thread, restoring the count after (it is process-wide).
    qpth needs it: it crashes intermittently with more threads on this torch version."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def threads_for(B: int, n: int, p: int, device: torch.device) -> Iterator[None]:
    """One torch thread for small CPU problems (``B (n + p)^2 <= ONE_THREAD_SIZE``).

    Their tensors are far too small for intra-op parallelism to help, but the batched LAPACK
    calls still start every thread, and on a busy machine each call then waits for descheduled
    threads. (``torch.set_num_threads`` is process-wide; it is restored on exit.)
    """
    if device.type != "cpu" or B * (n + p) ** 2 > ONE_THREAD_SIZE or torch.get_num_threads() == 1:
        yield
        return
    with one_thread():
        yield
