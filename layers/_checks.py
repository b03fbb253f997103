"""Input checks shared by the layers (every message says what was wrong and how to fix it), and
the error every layer raises when a solve fails (:class:`SolverError`).

Bad input: one policy for every public layer
--------------------------------------------
Every public function and module of :mod:`layers` answers a bad input with the right result or
one clear error, never NaN, Inf or garbage. Tensor inputs go through :func:`check_tensor`.

* **NaN / Inf**: ``ValueError`` naming the argument and the count ("scores has 1 NaN/Inf
  entries; clean the input before this layer").
* **Huge finite values** (1e30 in float32, 1e300 in float64): the right result, computed
  safely. The LP sort relaxations are shift invariant and narrow score gaps too wide to matter
  (:func:`layers._sort_common.compress_gaps`); NeuralSort and Sinkhorn compute in float64 when
  float32 logits would overflow; nearest neighbours are found in coordinates rescaled by a
  power of two; ``torch-ipm`` solves QP data far from unit size as ``x = beta y`` and TV
  certificates are computed at unit scale. Where the result itself overflows (squared
  distances, NeuralSort logits beyond float64) a ``ValueError`` says so and what to do; where a
  solver cannot reach its relative accuracy on such data (cvxpylayers backends, qpth) its
  :class:`SolverError` ends with :func:`scale_advice` (rescale the data to order 1).
* **float16 / bfloat16**: computed in float32 (float64 in the QP, TV and CVXPY solvers) and
  returned in the input's dtype.
* **integer / bool dtype**: ``TypeError`` saying to convert (``.float()``); kNN labels, which
  must be integers, are the one exception.
* **empty batch** (``B = 0``): empty outputs of the right shape and dtype, computed without a
  solver; backward works and gives empty gradients.
* **no items / variables** (``n = 0``): ``ValueError`` saying at least one is needed
  (``pairwise_sq_dists``, which solves nothing, returns its empty matrix).
* **one item / variable** (``n = 1``): the trivial result, with finite gradients.
* **wrong shape** (too few dims, sizes that disagree between arguments): ``ValueError`` naming
  the argument, its shape and the shape expected.
* **meta tensors**: ``ValueError`` from :func:`check_tensor`: a layer needs the values, so the
  input must be on a real device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "SolverError",
    "check_finite",
    "check_not_meta",
    "check_positive",
    "check_tensor",
    "empty_outputs",
    "format_indices",
    "scale_advice",
]


def check_tensor(
    name: str,
    x: torch.Tensor,
    *,
    min_dim: int = 1,
    dims: Sequence[int] | None = None,
    expected: str | None = None,
) -> None:
    """``x`` is a floating tensor, not on the meta device, with at least ``min_dim`` dims (or a
    number of dims in ``dims``) and only finite values (the policy in this module's docstring).
    ``expected`` (e.g. ``"(n,) or (B, n)"``) is the shape the dims error names."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; use .float()"
        )
    check_not_meta(name, x)
    if (dims is not None and x.dim() not in dims) or x.dim() < min_dim:
        if expected is not None:
            want = f"shape {expected}"
        elif dims is not None:
            want = " or ".join(str(d) for d in dims) + " dims"
        else:
            want = f"at least {min_dim} dims"
        raise ValueError(f"{name} must have {want}, got shape {tuple(x.shape)}")
    check_finite(name, x)


def check_not_meta(name: str, x: torch.Tensor) -> None:
    """``x`` is not a meta tensor (which has a shape but no values)."""
    if x.device.type == "meta":
        raise ValueError(
            f"{name} is a meta tensor (shape {tuple(x.shape)}): meta tensors cannot be solved, "
            "as the layer needs the values; create it on a real device (e.g. 'cpu' or 'cuda')"
        )


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in a floating ``x``: one pass of ``aminmax`` (which propagates NaN), several
    times faster than ``isfinite(x).all()`` on large tensors, which writes a mask first."""
    if x.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(x.detach())
    except (RuntimeError, NotImplementedError):  # a dtype or device without aminmax
        return bool(torch.isfinite(x).all())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(name: str, x: torch.Tensor) -> None:
    """A floating ``x`` has no NaN/Inf entries (other dtypes pass)."""
    check_not_meta(name, x)
    if x.is_floating_point() and not _all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {bad} NaN/Inf entries; clean the input before this layer")


def empty_outputs(
    inputs: Sequence[torch.Tensor | None],
    shapes: Sequence[Sequence[int]],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """The outputs of an empty batch: zeros of each shape in ``shapes`` (each has a 0 in it),
    made without a solver. They depend on the ``inputs`` that require grad, with weight 0, so
    backward runs through them and gives those inputs zero (for batched ones: empty)
    gradients."""
    link = torch.zeros((), dtype=dtype, device=device)
    for t in inputs:
        if t is not None and t.requires_grad:
            link = link + (t.sum() * 0).to(dtype=dtype, device=device)
    return tuple(torch.zeros(tuple(sh), dtype=dtype, device=device) + link for sh in shapes)


def check_positive(name: str, value: float | torch.Tensor) -> None:
    """``value`` (a number or tensor) is finite and > 0."""
    if isinstance(value, torch.Tensor):
        check_not_meta(name, value)
        v = value.detach()
        ok = bool(torch.isfinite(v).all()) and not bool((v <= 0).any())
    else:  # a number: checked without making a tensor (this runs on every call of a layer)
        ok = math.isfinite(float(value)) and float(value) > 0
    if not ok:
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


# Data whose largest entry reaches this get :func:`scale_advice`'s sentence when a solve fails.
LARGE_DATA = 1e10


def scale_advice(tensors: Mapping[str, torch.Tensor | None]) -> str:
    """A sentence for a failed solve on data far from 1 (empty when every entry is below
    :data:`LARGE_DATA` in magnitude): which input is largest, and to rescale."""
    top, where = 0.0, ""
    for name, t in tensors.items():
        if t is None or t.numel() == 0 or not t.is_floating_point() or t.device.type == "meta":
            continue
        v = float(t.detach().abs().max().double())
        if v > top:
            top, where = v, name
    if not top >= LARGE_DATA:
        return ""
    return (
        f"The data reach |{where}| = {top:.3g}: values this large overflow or exhaust the "
        "solver's float64 relative accuracy; rescale the problem so its data are of order 1."
    )
