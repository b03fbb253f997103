"""optlayers: differentiable optimization layers for PyTorch.

* ``layers.sort``: sort relaxations behind one interface (``get_sort(name)``, ``SORTS``).
* ``layers.knn``: hard kNN and the differentiable kNN (``DKNN``).
* ``layers.qp``: the OptNet QP layer (``qp``, ``OptNetQP``) and its batched IPM solver.
* ``layers.tv``: total-variation denoising (``tv_denoise``, ``TVDenoise``).
* ``layers.backends``: the solver-backend table (``BACKENDS``, ``get_backend``).
"""

from layers.backends import (
    BACKENDS,
    DEFAULT_BACKEND,
    Backend,
    CvxpyProblemLayer,
    SolverError,
    get_backend,
)
from layers.knn import DKNN, knn_vote, nearest_neighbors, pairwise_sq_dists
from layers.qp import STATUS_NAMES, OptNetQP, QPInfo, QPSolution, kkt_residuals, qp, solve_qp
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
from layers.tv import (
    TV_BACKENDS,
    TVDenoise,
    TVDenoise2d,
    TVInfo,
    difference_matrix,
    grid_difference_matrix,
    tv_denoise,
    tv_denoise_2d,
    tv_error_bound,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "DKNN",
    "SORTS",
    "STATUS_NAMES",
    "TV_BACKENDS",
    "Backend",
    "CvxpyProblemLayer",
    "LPBirkhoff",
    "LPPermutahedron",
    "LPTopK",
    "NeuralSort",
    "OptNetQP",
    "QPInfo",
    "QPSolution",
    "Sinkhorn",
    "SolverError",
    "SortRelaxation",
    "StochasticNeuralSort",
    "TVDenoise",
    "TVDenoise2d",
    "TVInfo",
    "difference_matrix",
    "get_backend",
    "get_sort",
    "grid_difference_matrix",
    "kkt_residuals",
    "knn_vote",
    "lp_birkhoff_sort",
    "lp_permutahedron_sort",
    "lp_topk",
    "nearest_neighbors",
    "neural_sort",
    "pairwise_sq_dists",
    "qp",
    "sinkhorn_sort",
    "soft_rank",
    "soft_sort",
    "solve_qp",
    "stochastic_neural_sort",
    "tv_denoise",
    "tv_denoise_2d",
    "tv_error_bound",
]
