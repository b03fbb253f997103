"""Input checks shared by the layers: every message says what was wrong and how to fix it."""

from __future__ import annotations

import torch


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
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name} has {bad} NaN/Inf entries; clean the input before this layer")


def check_positive(name: str, value: float | torch.Tensor) -> None:
    """``value`` (a number or tensor) is finite and > 0."""
    v = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if not torch.isfinite(v).all() or (v <= 0).any():
        raise ValueError(f"{name} must be > 0 and finite, got {value}")
