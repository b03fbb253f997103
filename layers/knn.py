"""k-nearest neighbours: hard kNN (chunked, any device) and the differentiable DKNN."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from layers._checks import check_not_meta, check_tensor
from layers._sort_common import upcast_half
from layers.sort import SortRelaxation, get_sort

__all__ = ["DKNN", "knn_vote", "nearest_neighbors", "pairwise_sq_dists"]

# Inputs beyond this magnitude are rescaled by a power of two before their squared distances are
# taken (exact), so the nearest neighbours of huge but finite points are still found.
_RESCALE_ABOVE = 2.0**40


def _check_points(
    qname: str, queries: torch.Tensor, cname: str, candidates: torch.Tensor, qshape: str
) -> None:
    """Two finite floating point sets with the same number of features."""
    check_tensor(qname, queries, min_dim=2, expected=qshape)
    check_tensor(cname, candidates, min_dim=2, expected="(..., n, d)")
    if queries.shape[-1] != candidates.shape[-1]:
        raise ValueError(
            f"expected {qname} {qshape} and {cname} with the same number of features d (last "
            f"dim), got {tuple(queries.shape)} and {tuple(candidates.shape)}"
        )


def _check_no_overflow(d: torch.Tensor, *inputs: torch.Tensor) -> None:
    """Finite inputs whose (squared) distances overflow the dtype get their own message."""
    if not bool(torch.isfinite(d).all()):
        top = max(float(t.abs().max()) for t in inputs if t.numel())
        fix = "scale the inputs down" + ("" if d.dtype == torch.float64 else " or use float64")
        raise ValueError(f"distances overflow {d.dtype} (inputs up to |x| = {top:.3g}); {fix}")


def pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(..., m, d), (..., n, d) -> (..., m, n)``, clamped at 0.

    Half precision is computed in float32 and returned in its own dtype. Raises ``ValueError``
    for NaN/Inf inputs, mismatched shapes and finite inputs whose distances overflow the dtype;
    ``TypeError`` for integer inputs. Empty sets give an empty matrix.
    """
    _check_points("x", x, "y", y, "(..., m, d)")
    xf, yf = upcast_half(x), upcast_half(y)
    d = xf.pow(2).sum(-1, keepdim=True) - 2.0 * (xf @ yf.transpose(-1, -2)) + yf.pow(2).sum(-1)
    d = (d.clamp_min_(0.0) if not d.requires_grad else d.clamp_min(0.0)).to(x.dtype)
    _check_no_overflow(d, x, y)
    return d


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

    Queries are processed ``chunk_size`` at a time, so memory stays ``O(chunk_size * n)``. Half
    precision is computed in float32; points beyond ``2**40`` in magnitude are rescaled by a
    power of two first (exact), so huge finite inputs still give their neighbours.

    Args:
        queries: ``(m, d)`` (``m`` may be 0); candidates: ``(n, d)``, ``n >= 1``, on the same
            device.
        k: number of neighbours, ``1 <= k <= n``.
        progress: show a progress bar (a string is used as its label).

    Returns:
        ``(distances, indices)``, both ``(m, k)``, nearest first; distances in the queries'
        dtype.
    """
    _check_points("queries", queries, "candidates", candidates, "(m, d)")
    if queries.dim() != 2 or candidates.dim() != 2:
        raise ValueError(
            f"expected queries (m, d) and candidates (n, d), got {tuple(queries.shape)} and "
            f"{tuple(candidates.shape)}"
        )
    n = candidates.shape[0]
    if n == 0:
        raise ValueError(
            f"candidates has shape {tuple(candidates.shape)}: at least one candidate is needed"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of candidates), got {k!r}")
    qf, cf = upcast_half(queries), upcast_half(candidates)
    top = max((float(t.abs().max()) for t in (qf, cf) if t.numel()), default=0.0)
    scale = 1.0
    if top > _RESCALE_ABOVE:  # a power of two: the rescaled coordinates are exact
        scale = 2.0 ** math.floor(math.log2(top))
        qf, cf = qf / scale, cf / scale
    cand_sq = cf.pow(2).sum(-1)
    dists, idxs = [], []
    starts = range(0, qf.shape[0], chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress if isinstance(progress, str) else "kNN", leave=False)
    for s in starts:
        q = qf[s : s + chunk_size]
        d = q.pow(2).sum(-1, keepdim=True) - 2.0 * (q @ cf.T) + cand_sq
        top_k = torch.topk(d, k, dim=1, largest=False, sorted=True)
        dists.append(top_k.values.clamp_min_(0.0).sqrt_())
        idxs.append(top_k.indices)
    if not dists:  # no queries
        dists.append(qf.new_zeros(0, k))
        idxs.append(torch.zeros(0, k, dtype=torch.long, device=qf.device))
    dist = (torch.cat(dists) * scale).to(queries.dtype)
    _check_no_overflow(dist, queries, candidates)
    return dist, torch.cat(idxs)


def knn_vote(
    neighbor_labels: torch.Tensor,
    neighbor_dists: torch.Tensor,
    num_classes: int,
    weighting: Literal["uniform", "distance"] = "uniform",
) -> torch.Tensor:
    """Majority vote over the first k neighbours: ``(m, k) labels, (m, k) distances -> (m,)``.

    ``uniform`` counts each neighbour once; ``distance`` weights it by 1 / distance (a neighbour at
    distance 0 takes the vote alone), as scikit-learn's ``KNeighborsClassifier``. Ties go to the
    smallest label. Labels must be integers in ``0..num_classes-1``; half-precision distances are
    weighted in float32.
    """
    check_not_meta("neighbor_labels", neighbor_labels)
    if (
        neighbor_labels.is_floating_point()
        or neighbor_labels.is_complex()
        or (neighbor_labels.dtype == torch.bool)
    ):
        raise TypeError(
            f"neighbor_labels must be an integer tensor, got dtype {neighbor_labels.dtype}; "
            "use .long()"
        )
    check_tensor("neighbor_dists", neighbor_dists, dims=(2,), expected="(m, k)")
    if neighbor_labels.shape != neighbor_dists.shape:
        raise ValueError(
            f"neighbor_labels has shape {tuple(neighbor_labels.shape)} but neighbor_dists "
            f"{tuple(neighbor_dists.shape)}; both must be (m, k)"
        )
    if neighbor_dists.shape[1] == 0:
        raise ValueError(
            f"neighbor_dists has shape {tuple(neighbor_dists.shape)}: at least one neighbour "
            "(k >= 1) is needed"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if neighbor_labels.numel() and not (
        0 <= int(neighbor_labels.min()) and int(neighbor_labels.max()) < num_classes
    ):
        raise ValueError(
            f"neighbor_labels must be in 0..{num_classes - 1} (num_classes={num_classes}), got "
            f"values in {int(neighbor_labels.min())}..{int(neighbor_labels.max())}"
        )
    dists = upcast_half(neighbor_dists)
    if weighting == "uniform":
        w = torch.ones_like(dists)
    elif weighting == "distance":
        zero = dists <= 0
        w = torch.where(zero.any(1, keepdim=True), zero.to(dists.dtype), 1.0 / dists)
    else:
        raise ValueError(f"weighting must be 'uniform' or 'distance', got {weighting!r}")
    votes = torch.zeros(neighbor_labels.shape[0], num_classes, dtype=w.dtype, device=w.device)
    votes.scatter_add_(1, neighbor_labels.long(), w)
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
        stochastic relaxation with ``S`` samples); each row sums to ``k``. ``M`` may be 0."""
        _check_points("queries", queries, "candidates", candidates, "(M, d)")
        if queries.dim() != 2 or candidates.dim() != 2:
            raise ValueError(
                f"expected queries (M, d) and candidates (N, d), got {tuple(queries.shape)} and "
                f"{tuple(candidates.shape)}"
            )
        if candidates.shape[0] == 0:
            raise ValueError(
                f"candidates has shape {tuple(candidates.shape)}: at least one candidate is needed"
            )
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
