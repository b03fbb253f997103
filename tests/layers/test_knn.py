"""layers/knn.py: hard kNN against scikit-learn."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from layers.knn import knn_vote, nearest_neighbors, pairwise_sq_dists


def _digits_split(test_size: int = 360, seed: int = 0):
    """scikit-learn's digits (8 x 8, 1797 images), split once by a fixed permutation."""
    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = torch.as_tensor(x, dtype=torch.float64)[perm], torch.as_tensor(y)[perm]
    return x[test_size:], y[test_size:], x[:test_size], y[:test_size]


def test_pairwise_sq_dists():
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    assert torch.allclose(pairwise_sq_dists(x, y), torch.cdist(x, y) ** 2)


@pytest.mark.parametrize("weighting", ["uniform", "distance"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_sklearn(k, weighting):
    tr, train_y, te, _ = _digits_split()
    dist, idx = nearest_neighbors(te, tr, k, chunk_size=64)
    pred = knn_vote(train_y[idx], dist, 10, weighting)
    ref = KNeighborsClassifier(n_neighbors=k, weights=weighting, algorithm="brute")
    ref.fit(tr.numpy(), train_y.numpy())
    agree = (pred.numpy() == ref.predict(te.numpy())).mean()
    assert agree >= 0.995  # only exact-tie order may differ


def test_chunking_does_not_change_result():
    q, c = torch.randn(50, 4), torch.randn(30, 4)
    a = nearest_neighbors(q, c, 3, chunk_size=7)
    b = nearest_neighbors(q, c, 3, chunk_size=1000)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0])


def test_distance_weighting_exact_match_wins():
    labels = torch.tensor([[1, 0, 0]])
    dists = torch.tensor([[0.0, 0.1, 0.1]])
    assert knn_vote(labels, dists, 2, "distance").item() == 1
    assert knn_vote(labels, dists, 2, "uniform").item() == 0


def test_errors():
    with pytest.raises(ValueError, match=r"k must be in 1\.\.4"):
        nearest_neighbors(torch.randn(2, 3), torch.randn(4, 3), 5)
    with pytest.raises(ValueError, match="expected queries"):
        nearest_neighbors(torch.randn(2, 3), torch.randn(4, 2), 1)
    with pytest.raises(ValueError, match="weighting"):
        knn_vote(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), 2, "gaussian")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused(bad: float) -> None:
    x, y = torch.randn(4, 3), torch.randn(5, 3)
    x[1, 2] = bad
    for call in (
        lambda: pairwise_sq_dists(x, y),
        lambda: nearest_neighbors(x, y, 2),
        lambda: knn_vote(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[bad, 1.0]]), 2),
    ):
        with pytest.raises(ValueError, match="NaN/Inf"):
            call()


def test_overflowing_distances_say_so() -> None:
    """Finite inputs near 1e20 overflow float32 inside the squared distance, not in the input;
    nearest_neighbors rescales them and finds the neighbours (distances are representable)."""
    x, y = torch.randn(4, 3) * 1e20, torch.randn(5, 3) * 1e20
    with pytest.raises(ValueError, match="overflow"):
        pairwise_sq_dists(x, y)
    assert torch.isfinite(pairwise_sq_dists(x.double(), y.double())).all()  # float64 is enough
    d, i = nearest_neighbors(x, y, 2)
    d_ref, i_ref = nearest_neighbors(x / 1e20, y / 1e20, 2)
    assert torch.equal(i, i_ref) and torch.allclose(d / 1e20, d_ref, rtol=1e-5)
