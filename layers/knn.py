"""k-nearest neighbours: hard kNN (chunked, any device) and the differentiable DKNN."""

from __future__ import annotations

from typing import Any, Literal

import torch

from layers._checks import check_finite
from layers.sort import SortRelaxation, get_sort

__all__ = ["DKNN", "knn_vote", "nearest_neighbors", "pairwise_sq_dists"]


def _check_no_overflow(d: torch.Tensor, *inputs: torch.Tensor) -> None:
    """Finite inputs whose squared distances overflow the dtype get their own message."""
    if not bool(torch.isfinite(d).all()):
        top = max(float(t.abs().max()) for t in inputs if t.numel())
        raise ValueError(
            f"squared distances overflow {d.dtype} (inputs up to |x| = {top:.3g}); scale the "
            "inputs down or use float64"
        )


def pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(m, d), (n, d) -> (m, n)``, clamped at 0.

    Raises ``ValueError`` for NaN/Inf inputs and for finite inputs whose distances overflow.
    """
    check_finite("x", x)
    check_finite("y", y)
    d = x.pow(2).sum(-1, keepdim=True) - 2.0 * (x @ y.transpose(-1, -2)) + y.pow(2).sum(-1)
    _check_no_overflow(d, x, y)
    return d.clamp_min_(0.0) if not d.requires_grad else d.clamp_min(0.0)


@torch.no_grad()
def nearest_neighbors(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    *,
    chunk_size: int = 1024,
    progress: bool | str = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest candidates of every query, by Euclidean distance.

    Queries are processed ``chunk_size`` at a time, so memory stays ``O(chunk_size * n)``.

    Args:
        queries: ``(m, d)``; candidates: ``(n, d)`` on the same device.
        k: number of neighbours, ``1 <= k <= n``.
        progress: show a progress bar (a string is used as its label).

    Returns:
        ``(distances, indices)``, both ``(m, k)``, nearest first.
    """
    if queries.dim() != 2 or candidates.dim() != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"expected queries (m, d) and candidates (n, d), got {tuple(queries.shape)} and "
            f"{tuple(candidates.shape)}"
        )
    n = candidates.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of candidates), got {k}")
    check_finite("queries", queries)
    check_finite("candidates", candidates)
    cand_sq = candidates.pow(2).sum(-1)
    dists, idxs = [], []
    starts = range(0, queries.shape[0], chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress if isinstance(progress, str) else "kNN", leave=False)
    for s in starts:
        q = queries[s : s + chunk_size]
        d = q.pow(2).sum(-1, keepdim=True) - 2.0 * (q @ candidates.T) + cand_sq
        _check_no_overflow(d, q, candidates)
        top = torch.topk(d, k, dim=1, largest=False, sorted=True)
        dists.append(top.values.clamp_min_(0.0).sqrt_())
        idxs.append(top.indices)
    return torch.cat(dists), torch.cat(idxs)


def knn_vote(
    neighbor_labels: torch.Tensor,
    neighbor_dists: torch.Tensor,
    num_classes: int,
    weighting: Literal["uniform", "distance"] = "uniform",
) -> torch.Tensor:
    """Majority vote over the first k neighbours: ``(m, k) labels, (m, k) distances -> (m,)``.

    ``uniform`` counts each neighbour once; ``distance`` weights it by 1 / distance (a neighbour at
    distance 0 takes the vote alone), as scikit-learn's ``KNeighborsClassifier``. Ties go to the
    smallest label.
    """
    check_finite("neighbor_dists", neighbor_dists)
    if weighting == "uniform":
        w = torch.ones_like(neighbor_dists)
    elif weighting == "distance":
        zero = neighbor_dists <= 0
        w = torch.where(
            zero.any(1, keepdim=True), zero.to(neighbor_dists.dtype), 1.0 / neighbor_dists
        )
    else:
        raise ValueError(f"weighting must be 'uniform' or 'distance', got {weighting!r}")
    votes = torch.zeros(neighbor_labels.shape[0], num_classes, dtype=w.dtype, device=w.device)
    votes.scatter_add_(1, neighbor_labels, w)
    return votes.argmax(1)


class DKNN(torch.nn.Module):
    """Differentiable k-nearest neighbours (Grover et al., ICLR 2019).

    Candidates are scored by negative squared distance to each query, and membership in the
    query's top k is relaxed by a sort relaxation from ``layers.sort`` (``neuralsort``,
    ``neuralsort-stochastic``, ``lp-topk``, ...). As ``tau -> 0`` the membership is the hard kNN
    indicator.

    Args:
        k: number of neighbours.
        sort: name of the relaxation (see ``layers.sort.SORTS``) or a ``SortRelaxation``.
        tau: temperature / regularization strength of the relaxation (> 0).
        **sort_kwargs: passed to the relaxation (e.g. ``num_samples``, ``backend``).
    """

    def __init__(
        self,
        k: int,
        sort: str | SortRelaxation = "neuralsort",
        tau: float = 16.0,
        **sort_kwargs: Any,
    ):
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = k
        self.relaxation = (
            sort if isinstance(sort, SortRelaxation) else get_sort(sort, tau=tau, **sort_kwargs)
        )

    def forward(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Relaxed top-k membership: ``(M, d), (N, d) -> (M, N)`` (or ``(S, M, N)`` for a
        stochastic relaxation with ``S`` samples); each row sums to ``k``."""
        if candidates.shape[0] < self.k:
            raise ValueError(
                f"k={self.k} is larger than the {candidates.shape[0]} candidates; "
                "use more candidates (--num_train_neighbors) or a smaller k"
            )
        scores = -pairwise_sq_dists(queries, candidates)
        return self.relaxation.topk(scores, self.k)

    def loss(
        self,
        queries: torch.Tensor,
        candidates: torch.Tensor,
        query_labels: torch.Tensor,
        candidate_labels: torch.Tensor,
    ) -> torch.Tensor:
        """The paper's loss: minus the (relaxed) number of same-label candidates in the top k,
        averaged over queries (and samples). ``-loss / k`` is the top-k correctness in [0, 1]."""
        topk = self(queries, candidates)
        correct = (query_labels[:, None] == candidate_labels[None, :]).to(topk.dtype)
        return -(topk * correct).sum(-1).mean()
