"""Checks and small helpers shared by the sort relaxations (:mod:`layers.sort`,
:mod:`layers.sort_lp`): argument checks, centring, the exact sort and straight-through."""

from __future__ import annotations

import torch

from layers._checks import check_positive, check_tensor

__all__ = [
    "centred",
    "check_k",
    "check_scores",
    "check_strength",
    "descending_order",
    "hard_permutation",
    "hard_topk",
    "straight_through",
    "temperature",
    "upcast_half",
]


def check_scores(scores: torch.Tensor, name: str = "scores") -> int:
    """``scores`` is a finite floating tensor ``(..., n)`` with ``n >= 1``; returns ``n``."""
    check_tensor(name, scores, min_dim=1)
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
