"""Input checks shared by the layers (every message says what was wrong and how to fix it), and
the error every layer raises when a solve fails (:class:`SolverError`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SolverError", "check_finite", "check_positive", "check_tensor", "format_indices"]


def check_tensor(name: str, x: torch.Tensor, *, min_dim: int = 1) -> None:
    """``x`` is a floating tensor with at least ``min_dim`` dims and only finite values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; use .float()"
        )
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")
    check_finite(name, x)


def check_finite(name: str, x: torch.Tensor) -> None:
    """A floating ``x`` has no NaN/Inf entries (other dtypes pass)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {bad} NaN/Inf entries; clean the input before this layer")


def check_positive(name: str, value: float | torch.Tensor) -> None:
    """``value`` (a number or tensor) is finite and > 0."""
    v = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if not torch.isfinite(v).all() or (v <= 0).any():
        raise ValueError(f"{name} must be > 0 and finite, got {value}")


class SolverError(RuntimeError):
    """A solve failed (infeasible, unbounded, inaccurate) for some batch elements.

    ``failed`` lists the batch elements concerned (empty if unknown).
    """

    def __init__(self, message: str, failed: Sequence[int] = ()):
        super().__init__(message)
        self.failed = list(failed)


def format_indices(idx: Sequence[int], k: int = 10) -> str:
    """``[i0, i1, ...]`` with at most ``k`` indices shown and the total count when cut."""
    idx = list(idx)
    return str(idx[:k])[:-1] + (f", ... ({len(idx)} in all)]" if len(idx) > k else "]")
