"""optlayers: differentiable optimization layers for PyTorch."""

from layers.backends import BACKENDS, CvxpyProblemLayer, SolverError, get_backend
from layers.knn import knn_vote, nearest_neighbors, pairwise_sq_dists

__all__ = [
    "BACKENDS",
    "CvxpyProblemLayer",
    "SolverError",
    "get_backend",
    "knn_vote",
    "nearest_neighbors",
    "pairwise_sq_dists",
]
