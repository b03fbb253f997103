"""Input preparation for the QP layer: validate shapes and values, broadcast to one batch size,
cast to the working dtype (:func:`prepare_qp`, giving a :class:`QPProblem`), and the PSD check."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import layers.qp_ipm as qp_ipm
from layers._checks import check_tensor, format_indices

__all__ = ["QPProblem", "check_psd_matrix", "prepare_qp"]

_RANKS = {"Q": 2, "q": 1, "G": 2, "h": 1, "A": 2, "b": 1}


@dataclass
class QPProblem:
    """Batched float64 problem data plus what is needed to give results back."""

    Q: Tensor
    q: Tensor
    G: Tensor
    h: Tensor
    A: Tensor
    b: Tensor
    unbatched: bool
    dtype: torch.dtype
    device: torch.device

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return self.q.shape[0], self.q.shape[1], self.G.shape[1], self.A.shape[1]


def prepare_qp(
    Q: Tensor,
    q: Tensor,
    G: Tensor | None,
    h: Tensor | None,
    A: Tensor | None,
    b: Tensor | None,
    check_psd: bool,
    wd: torch.dtype = torch.float64,
) -> QPProblem:
    """Validate shapes and values, broadcast to one batch size (which may be 0), cast to
    ``wd``."""
    if (G is None) != (h is None):
        raise ValueError(
            "give G and h together (or neither); got only " + ("G" if h is None else "h")
        )
    if (A is None) != (b is None):
        raise ValueError(
            "give A and b together (or neither); got only " + ("A" if b is None else "b")
        )
    given = {"Q": Q, "q": q, "G": G, "h": h, "A": A, "b": b}
    for name, t in given.items():
        if t is not None:
            check_tensor(name, t)
            if t.dim() not in (_RANKS[name], _RANKS[name] + 1):
                raise ValueError(
                    f"{name} must have {_RANKS[name]} dims, or {_RANKS[name] + 1} with a leading "
                    f"batch dim; got shape {tuple(t.shape)}"
                )
    n = q.shape[-1]
    if n == 0:
        raise ValueError(
            f"q has shape {tuple(q.shape)}: the QP needs at least one variable (n >= 1)"
        )
    batch = {k: t.shape[0] for k, t in given.items() if t is not None and t.dim() > _RANKS[k]}
    if len(set(batch.values())) > 1:
        raise ValueError(f"batch sizes differ: {batch}; use one batch size or unbatched inputs")
    B = next(iter(batch.values()), 1)
    m = G.shape[-2] if G is not None else 0
    p = A.shape[-2] if A is not None else 0
    want = {"Q": (n, n), "q": (n,), "G": (m, n), "h": (m,), "A": (p, n), "b": (p,)}
    for name, t in given.items():
        if t is not None and tuple(t.shape[-_RANKS[name] :]) != want[name]:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected (batch?, "
                f"{', '.join(map(str, want[name]))}) for n={n}, m={m}, p={p}"
            )
    dtype, device = q.dtype, q.device
    if check_psd:
        check_psd_matrix(Q.detach())

    def bat(name: str, t: Tensor | None) -> Tensor:
        if t is None:
            shape = (B, 0, n) if _RANKS[name] == 2 else (B, 0)
            return torch.zeros(shape, dtype=wd, device=device)
        t = t.to(device=device, dtype=wd)
        return t if t.dim() > _RANKS[name] else t.expand(B, *t.shape)

    return QPProblem(
        bat("Q", Q),
        bat("q", q),
        bat("G", G),
        bat("h", h),
        bat("A", A),
        bat("b", b),
        unbatched=not batch,
        dtype=dtype,
        device=device,
    )


def check_psd_matrix(Q: Tensor) -> None:
    """``Q`` (``(n, n)`` or ``(B, n, n)``) is symmetric-part PSD up to a relative 1e-8."""
    bad = _psd_failures(Q)
    if bad is None:
        Qs = 0.5 * (Q + Q.mT).to(torch.float64)
        scale = Qs.abs().amax((-1, -2), keepdim=True).clamp_min(1e-300)
        eye = torch.eye(Qs.shape[-1], dtype=Qs.dtype, device=Qs.device)
        _, info = torch.linalg.cholesky_ex(Qs + 1e-8 * scale * eye)
        bad = torch.nonzero(info.reshape(-1) != 0).flatten().tolist()
    if bad:
        Qb = Q.reshape(-1, *Q.shape[-2:])[bad[0]].to(torch.float64)
        Qb = 0.5 * (Qb + Qb.mT)
        low = torch.linalg.eigvalsh(Qb)[0].item()
        where = f" for batch elements {format_indices(bad)}" if Q.dim() == 3 else ""
        raise ValueError(
            f"Q is not positive semidefinite{where} (smallest eigenvalue {low:.3g}); "
            "the QP is nonconvex. Use e.g. Q = L L' + eps I."
        )


def _psd_failures(Q: Tensor) -> list[int] | None:
    """The batch elements that fail :func:`check_psd_matrix`'s test, from the compiled loop of
    :mod:`layers._qp_kernel` (one Cholesky per element, in cache; a third of torch's batched
    ``cholesky_ex`` time at n = 128) on the CPU, or None where it does not apply."""
    kernel = qp_ipm._qp_kernel() if qp_ipm.use_compiled else None
    if kernel is None or Q.device.type != "cpu" or Q.numel() == 0:
        return None
    Qb = Q.reshape(-1, *Q.shape[-2:]).to(torch.float64).contiguous()
    bad = torch.empty(Qb.shape[0], dtype=torch.bool)
    with kernel.one_blas_thread():
        kernel.psd_failures(Qb.numpy(), 1e-8, bad.numpy())
    return torch.nonzero(bad).flatten().tolist()
