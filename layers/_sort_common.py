"""Checks and small helpers shared by the sort relaxations (:mod:`layers.sort`,
:mod:`layers.sort_lp`): argument checks, centring, gap compression, the exact sort and
straight-through."""

from __future__ import annotations

from typing import Any

import torch

from layers._checks import check_positive, check_tensor

__all__ = [
    "centred",
    "check_k",
    "check_scores",
    "check_strength",
    "compress_gaps",
    "descending_order",
    "hard_permutation",
    "hard_topk",
    "straight_through",
    "temperature",
    "upcast_half",
]


def check_scores(scores: torch.Tensor, name: str = "scores") -> int:
    """``scores`` is a finite floating tensor ``(..., n)`` with ``n >= 1``; returns ``n``."""
    check_tensor(name, scores, min_dim=1, expected="(..., n)")
    n = scores.shape[-1]
    if n < 1:
        raise ValueError(
            f"{name} must have at least one item in its last dim, got shape {tuple(scores.shape)}"
        )
    return n


def check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of items), got {k}")


def temperature(name: str, value: float | torch.Tensor) -> float:
    """A positive, finite temperature as a Python float (temperatures are not differentiated)."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    check_positive(name, value)
    return float(value)


def upcast_half(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 scores in float32 (their range overflows in the relaxations' logits
    and solvers; the callers return their results in the input's dtype); others unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def centred(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` minus their mean. Every relaxation here is invariant to a common shift; centring
    keeps logits and solver data small (the mean is detached: its gradient is zero anyway)."""
    return scores - scores.detach().mean(-1, keepdim=True)


_PLAIN_RANGE = 2.0**20  # score ranges (in units of the cap) solved without compressing gaps


class _CompressGaps(torch.autograd.Function):
    """The forward of :func:`compress_gaps`; its backward is the identity (see there)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cap: float) -> torch.Tensor:  # type: ignore[override]
        n = x.shape[-1]
        s, order = torch.sort(x, dim=-1, descending=True, stable=True)
        brk = (s[..., :-1] - s[..., 1:]) > cap  # an overflowing gap (inf) is a break too
        first = torch.ones(*brk.shape[:-1], 1, dtype=torch.bool, device=x.device)
        start = torch.cat([first, brk], -1)  # the first entry of each cluster
        pos = torch.arange(n, device=x.device).expand(s.shape)
        head = torch.where(start, pos, 0).cummax(-1).values
        within = s - s.gather(-1, head)  # <= 0, one rounding: exact differences in a cluster
        step = torch.zeros_like(s)
        step[..., 1:] = torch.where(brk, within[..., :-1] - cap, 0.0)
        out = within + step.cumsum(-1)
        return torch.empty_like(x).scatter_(-1, order, out)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None


def compress_gaps(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``x (..., n)`` shifted and with every gap wider than ``cap`` between neighbours in sorted
    order narrowed to ``cap``: the largest entry becomes 0 and the rest lie in
    ``[-(n - 1) cap, 0]``, in the same order, with differences inside a cluster (a run of gaps
    ``<= cap``) kept exactly (one rounding).

    The regularized LP relaxations depend on their scores only through such differences: with
    ``cap >= eps`` (the regularization strength; callers use ``2 eps``) no free entry of a
    top-k projection, and no row of the Birkhoff projection, reaches across a wider gap, so the
    solution is unchanged, and each cluster is invariant to its own shift. Scores like 1e30 or
    1e300, whose differences would swamp ``eps`` or overflow, are solved exactly this way.
    The gradient is passed through unchanged: the solvers' gradients sum to zero over each
    cluster, so the shifts (functions of the scores) contribute nothing.

    Scores whose range is within ``2**20`` gaps (every row's max minus min ``<= 2**20 cap``),
    where the solvers are accurate anyway, are only shifted (max to 0): the sort this costs
    otherwise doubles the time of a projection.
    """
    if x.numel() == 0:
        return x
    low, high = torch.aminmax(x.detach(), dim=-1, keepdim=True)
    if bool(((high - low) <= _PLAIN_RANGE * cap).all()):
        return x - high
    return _CompressGaps.apply(x, cap)


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Item indices from largest to smallest score; ties keep index order."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def hard_permutation(scores: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """The exact permutation matrix ``(..., rows, n)`` (row i = item of rank i)."""
    n = scores.shape[-1]
    rows = n if rows is None else rows
    order = descending_order(scores)[..., :rows]
    P = scores.new_zeros(*scores.shape[:-1], rows, n)
    return P.scatter_(-1, order.unsqueeze(-1), 1.0)


def hard_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The exact top-k indicator ``(..., n)`` (ties by index)."""
    order = descending_order(scores)[..., :k]
    return torch.zeros_like(scores).scatter_(-1, order, 1.0)


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Value of ``hard``, gradient of ``soft``."""
    return hard + (soft - soft.detach())


def check_strength(value: float | torch.Tensor) -> float:
    return temperature("regularization_strength", value)
