"""optlayers: differentiable optimization layers for PyTorch.

* ``layers.sort``: sort relaxations behind one interface (``get_sort(name)``, ``SORTS``).
* ``layers.knn``: hard kNN and the differentiable kNN (``DKNN``).
* ``layers.backends``: the solver-backend table (``BACKENDS``, ``get_backend``).
"""

from layers.backends import BACKENDS, CvxpyProblemLayer, SolverError, get_backend
from layers.knn import DKNN, knn_vote, nearest_neighbors, pairwise_sq_dists
from layers.sort import (
    SORTS,
    LPBirkhoff,
    LPPermutahedron,
    LPTopK,
    NeuralSort,
    Sinkhorn,
    SortRelaxation,
    StochasticNeuralSort,
    get_sort,
    lp_birkhoff_sort,
    lp_permutahedron_sort,
    lp_topk,
    neural_sort,
    sinkhorn_sort,
    soft_rank,
    soft_sort,
    stochastic_neural_sort,
)

__all__ = [
    "BACKENDS",
    "DKNN",
    "SORTS",
    "CvxpyProblemLayer",
    "LPBirkhoff",
    "LPPermutahedron",
    "LPTopK",
    "NeuralSort",
    "Sinkhorn",
    "SolverError",
    "SortRelaxation",
    "StochasticNeuralSort",
    "get_backend",
    "get_sort",
    "knn_vote",
    "lp_birkhoff_sort",
    "lp_permutahedron_sort",
    "lp_topk",
    "nearest_neighbors",
    "neural_sort",
    "pairwise_sq_dists",
    "sinkhorn_sort",
    "soft_rank",
    "soft_sort",
    "stochastic_neural_sort",
]
