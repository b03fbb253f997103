"""optlayers: differentiable optimization layers for PyTorch.

* ``layers.sort``: sort relaxations behind one interface (``get_sort(name)``, ``SORTS``);
  ``layers.sort_lp``: the regularized-LP relaxations and their CVXPY statements.
* ``layers.knn``: hard kNN and the differentiable kNN (``DKNN``).
* ``layers.qp``: the OptNet QP layer (``qp``, ``OptNetQP``); ``layers.qp_ipm``: its batched
  interior-point solver (``solve_qp``) and adjoint.
* ``layers.tv``: total-variation denoising (``tv_denoise``, ``TVDenoise``); ``layers.tv_native``:
  its native solver.
* ``layers.backends``: the solver-backend table (``BACKENDS``, ``get_backend``), the single source
  of every backend's settings; ``layers.cvxpy_layer``: a CVXPY problem as a layer.

Imports run one way (``tests/test_imports.py`` checks it)::

    _checks, _batched, _sort_common          input checks, SolverError, batched linear algebra
      <- qp_ipm, qp_elastic, tv_native,      the solvers (interior point, the closest feasible
         sort_native, qp_problem             QP, TV, sorts); the QP layer's input preparation
      <- backends                            the table (imports nothing from layers)
      <- qp_solve                            run a QP backend, check the answer
      <- cvxpy_layer                         a CVXPY problem as a layer
      <- qp, sort_lp <- sort <- knn, tv      the layers
      <- layers (this package)               re-exports

Importing it does not import cvxpy: the CVXPY-backed layers import it when they are built.
"""

from layers._checks import SolverError
from layers.backends import BACKENDS, DEFAULT_BACKEND, Backend, get_backend
from layers.cvxpy_layer import CvxpyProblemLayer
from layers.knn import DKNN, knn_vote, nearest_neighbors, pairwise_sq_dists
from layers.qp import OptNetQP, QPLayerInfo, qp
from layers.qp_ipm import STATUS_NAMES, QPInfo, QPSolution, kkt_residuals, solve_qp
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
    "QPLayerInfo",
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
