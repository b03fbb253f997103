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
