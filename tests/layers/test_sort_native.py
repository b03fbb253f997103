"""Tests for layers/sort_native.py: the exact LP-sort solvers against their CVXPY statements.

The CVXPY statements (:func:`layers.sort_lp.sort_qp_problem`) are the definition. They are solved
here through cvxpylayers with moreau's active-set method, which solves these small strictly
convex QPs exactly (the Birkhoff statement above n = 8 goes through moreau's interior point,
which is not exact: there the native solution is checked against the optimality conditions
instead). Values must agree to 1e-9 and gradients to 1e-7, on random inputs, ties, and huge and
small scales; float64 gradcheck; the hard limit as the strength goes to 0.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch.autograd import gradcheck

import layers.sort_lp as SL
from layers import SolverError, sort_native
from layers._sort_common import centred
from layers.sort_lp import lp_birkhoff_sort, lp_permutahedron_sort, lp_topk, soft_rank, soft_sort

F64 = torch.float64
VALUE_TOL, GRAD_TOL = 1e-9, 1e-7
pytestmark = pytest.mark.filterwarnings("ignore:Batch size has changed:UserWarning")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["compiled", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both CPU paths of the permutahedron and top-k solvers: numba's loops and the batched
    torch code (the path on other devices)."""
    if request.param == "compiled" and sort_native._kernels() is None:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(sort_native, "use_compiled", request.param == "compiled")
    return request.param


def _inputs(kind: str, B: int, n: int) -> torch.Tensor:
    """Random scores of a kind: plain, with ties, huge (1e6) or tiny (1e-6) scale."""
    x = torch.randn(B, n, dtype=F64)
    if kind == "ties":
        x = (2 * x).round() / 2
    elif kind == "huge":
        x = 1e6 * x
    elif kind == "tiny":
        x = 1e-6 * x
    return x


def exact_projection(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Projection onto the permutahedron in exact rational arithmetic (pool adjacent violators
    on ``Fraction`` s): the reference where a solver's own rounding is the question."""
    out = torch.empty_like(z)
    for b in range(z.shape[0]):
        order = sorted(range(z.shape[1]), key=lambda i: -float(z[b, i]))
        s = [Fraction(float(z[b, i])) for i in order]
        ws = sorted((Fraction(float(v)) for v in w[b]), reverse=True)
        blocks: list[tuple[Fraction, int]] = []  # (sum of y, size)
        for y in (si - wi for si, wi in zip(s, ws)):
            blocks.append((y, 1))
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
                (s2, c2), (s1, c1) = blocks.pop(), blocks.pop()
                blocks.append((s1 + s2, c1 + c2))
        v = [t / c for t, c in blocks for _ in range(c)]
        for pos, i in enumerate(order):
            out[b, i] = float(s[pos] - v[pos])
    return out


def _value_and_grad(f, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = f(x)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    return y.detach(), gx


def _agree(f_native, f_cvxpy, x: torch.Tensor, scale: float = 1.0) -> None:
    """Values agree to 1e-9 (times ``scale``) and gradients to 1e-7. With tied scores only the
    values are compared: there these maps are in general not differentiable (sorted values
    swap slots), and the solvers return different one-sided derivatives (moreau's active set
    even a non-zero Jacobian where the map is locally constant)."""
    y, _ = _value_and_grad(f_native, x, torch.zeros(()))
    g = torch.randn_like(y)
    y_n, g_n = _value_and_grad(f_native, x, g)
    y_c, g_c = _value_and_grad(f_cvxpy, x, g)
    assert (y_n - y_c).abs().max() <= VALUE_TOL * scale
    assert torch.isfinite(g_n).all()
    if not bool((torch.sort(x, dim=-1).values.diff(dim=-1) == 0).any()):
        assert (g_n - g_c).abs().max() <= GRAD_TOL * (1 + g_c.abs().max())


# ---------------------------------------------------------------------------------------------
# agreement with the CVXPY statements
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "ties", "huge", "tiny"])
@pytest.mark.parametrize("eps", [0.13, 1.1])  # ties at half-integers: no exact kink
def test_soft_rank_and_sort_match_cvxpy(kind: str, eps: float, path: str) -> None:
    x = _inputs(kind, 6, 7)
    top = x.abs().max().item()
    strength = eps * (top if kind in ("huge", "tiny") else 1.0)
    rho = torch.arange(7, 0, -1, dtype=F64).expand_as(x)
    # soft_rank = P_rho(x / eps); soft_sort = -P_{-x}(rho / eps)
    exact_rank = exact_projection(x / strength, rho)
    exact_sort = -exact_projection(rho / strength, -x)
    assert torch.allclose(soft_rank(x, strength, backend="native"), exact_rank, rtol=1e-14)
    assert torch.allclose(soft_sort(x, strength, backend="native"), exact_sort, rtol=1e-14)
    _agree(
        lambda v: soft_rank(v, strength, backend="native"),
        lambda v: soft_rank(v, strength, backend="moreau"),
        x,
    )
    if kind != "tiny":  # there the CVXPY path's data (s - w) spans 13 orders: its own error
        _agree(  # (about 2e-9) exceeds the tolerance, so the exact reference above decides
            lambda v: soft_sort(v, strength, backend="native"),
            lambda v: soft_sort(v, strength, backend="moreau"),
            x,
            max(1.0, top),
        )


@pytest.mark.parametrize("kind", ["plain", "ties", "huge"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_lp_topk_matches_cvxpy(kind: str, k: int, path: str) -> None:
    x = _inputs(kind, 5, 7)
    eps = 0.37 * (x.abs().max().item() if kind == "huge" else 1.0)  # no kink at a tie
    _agree(
        lambda v: lp_topk(v, k, eps, backend="native"),
        lambda v: lp_topk(v, k, eps, backend="moreau"),
        x,
    )


@pytest.mark.parametrize("kind", ["plain", "ties", "huge"])
def test_lp_permutahedron_sort_matches_cvxpy(kind: str) -> None:
    x = _inputs(kind, 4, 6)
    eps = 0.37 * (x.abs().max().item() if kind == "huge" else 1.0)  # no kink at a tie
    _agree(
        lambda v: lp_permutahedron_sort(v, eps, backend="native"),
        lambda v: lp_permutahedron_sort(v, eps, backend="moreau"),
        x,
    )


@pytest.mark.parametrize("n", [2, 5, 8])
@pytest.mark.parametrize("eps", [0.05, 1.1, 20.0])
def test_lp_birkhoff_sort_matches_cvxpy(n: int, eps: float) -> None:
    x = _inputs("plain", 4, n)
    _agree(
        lambda v: lp_birkhoff_sort(v, eps, backend="native"),
        lambda v: lp_birkhoff_sort(v, eps, backend="moreau"),
        x,
    )


@pytest.mark.parametrize("n", [16, 40])
@pytest.mark.parametrize("kind", ["plain", "ties"])
@pytest.mark.parametrize("eps", [0.01, 1.0])
def test_lp_birkhoff_sort_is_optimal(n: int, kind: str, eps: float) -> None:
    """Larger n: the solution satisfies the QP's optimality conditions to rounding. ``P`` is
    doubly stochastic and nonnegative, and ``P = [C - a 1' - 1 b']_+`` for duals ``(a, b)``,
    which is the KKT system of ``min |P - C|^2 / 2`` over the Birkhoff polytope."""
    x = _inputs(kind, 8, n)
    r = torch.arange(n - 1, -n, -2, dtype=F64)
    C = r.unsqueeze(-1) * (centred(x) / eps).unsqueeze(-2)
    a, b, _, done = sort_native.birkhoff_dual(C)
    assert bool(done.all())
    X = C - a.unsqueeze(-1) - b.unsqueeze(-2)
    P = lp_birkhoff_sort(x, eps, backend="native")
    tol = 1e-12 * (1 + C.abs().amax())
    assert torch.allclose(P, X.clamp_min(0), atol=float(tol), rtol=0)
    assert (P.sum(-1) - 1).abs().max() < 1e-9 and (P.sum(-2) - 1).abs().max() < 1e-9
    assert P.min() >= 0


def test_project_permutahedron_matches_isotonic_statement(path: str) -> None:
    """The generic projection (any ``w``) against the ``isotonic`` CVXPY statement's layer."""
    z, w = torch.randn(6, 9, dtype=F64), torch.randn(6, 9, dtype=F64)
    _agree(
        lambda v: sort_native.project_permutahedron(v, w),
        lambda v: SL._project_permutahedron(v, w, "moreau"),
        z,
    )


# ---------------------------------------------------------------------------------------------
# gradients, limits, shapes
# ---------------------------------------------------------------------------------------------


def test_gradcheck(path: str) -> None:
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    w = torch.randn(3, 6, dtype=F64, requires_grad=True)
    assert gradcheck(sort_native.project_permutahedron, (x, w))
    assert gradcheck(lambda v: sort_native.topk_projection(v, 2), (x,))
    assert gradcheck(sort_native.nested_topk_matrix, (x,))
    r = torch.arange(5, -6, -2, dtype=F64)
    assert gradcheck(lambda v: sort_native.birkhoff_projection(r[:, None] * v[..., None, :]), (x,))


@pytest.mark.parametrize("fn", ["soft_rank", "soft_sort", "topk", "permutahedron", "birkhoff"])
def test_hard_limit(fn: str, path: str) -> None:
    """Strength -> 0 gives the hard answer (distinct scores)."""
    x = torch.randn(5, 8, dtype=F64)
    eps = 1e-6
    order = torch.sort(x, dim=-1, descending=True).indices
    perm = torch.zeros(5, 8, 8, dtype=F64).scatter_(-1, order.unsqueeze(-1), 1.0)
    ranks = torch.argsort(torch.argsort(x, dim=-1), dim=-1).to(F64) + 1
    expected = {
        "soft_rank": (lambda: soft_rank(x, eps, backend="native"), ranks),
        "soft_sort": (lambda: soft_sort(x, eps, backend="native"), torch.sort(x).values),
        "topk": (lambda: lp_topk(x, 3, eps, backend="native"), perm[:, :3].sum(-2)),
        "permutahedron": (lambda: lp_permutahedron_sort(x, eps, backend="native"), perm),
        "birkhoff": (lambda: lp_birkhoff_sort(x, eps, backend="native"), perm),
    }
    got, want = expected[fn]
    assert torch.allclose(got(), want, atol=1e-9)


def test_leading_dims_dtypes_and_half_precision(path: str) -> None:
    x = torch.randn(2, 3, 7)
    for f in (
        lambda v: soft_rank(v, 0.3, backend="native"),
        lambda v: lp_topk(v, 2, 0.3, backend="native"),
        lambda v: lp_permutahedron_sort(v, 0.3, backend="native"),
        lambda v: lp_birkhoff_sort(v, 0.3, backend="native"),
    ):
        y64 = f(x.double())
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            y = f(x.to(dtype))
            assert y.dtype == dtype and y.shape == y64.shape and torch.isfinite(y).all()
            atol = 1e-5 if dtype == torch.float32 else 0.1
            assert torch.allclose(y.double(), y64, atol=atol * max(1.0, y64.abs().max().item()))
    # huge values: half precision overflows at 65504, the layer computes in float32
    big = (torch.randn(3, 5) * 1e4).half()
    r = soft_rank(big, backend="native")
    assert torch.isfinite(r).all() and r.dtype == torch.float16


def test_soft_rank_of_huge_values_stays_in_range(path: str) -> None:
    """Ranks of values near 1e8 (float32) and 1e30 (float64) lie in [1, n] and are the exact
    ranks: the pooling compares sorted values and weights separately (no cancellation)."""
    for x in (torch.randn(3, 5) * 1e8, torch.randn(3, 5, dtype=F64) * 1e30):
        r = soft_rank(x, backend="native")
        exact = torch.argsort(torch.argsort(x, dim=-1), dim=-1).to(x.dtype) + 1
        assert torch.equal(r, exact)


def test_birkhoff_failure_is_a_solver_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An element the Newton method does not solve is named, never returned inexact."""
    real = sort_native.birkhoff_dual

    def stalled(C, max_iter=100, start=None):
        a, b, M, done = real(C, max_iter, start)
        done[-1:] = False
        return a, b, M, done

    monkeypatch.setattr(sort_native, "birkhoff_dual", stalled)
    with pytest.raises(SolverError, match=r"batch elements \[2\]") as err:
        lp_birkhoff_sort(torch.randn(3, 4), backend="native")
    assert err.value.failed == [2]


def test_birkhoff_slow_elements_get_more_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Elements left unsolved by the short passes (here: each cut to one Newton step) are solved
    by the continuation's longer last solve, to the same projection."""
    x = _inputs("plain", 6, 9)
    want = lp_birkhoff_sort(x, 10.0, backend="native")
    real = sort_native.birkhoff_dual
    calls: list[int] = []

    def one_step_first(C, max_iter=100, start=None):
        calls.append(max_iter)
        return real(C, max_iter if max_iter > 100 else 1, start)

    monkeypatch.setattr(sort_native, "birkhoff_dual", one_step_first)
    got = lp_birkhoff_sort(x, 10.0, backend="native")
    assert calls[-1] > 100  # the longer pass ran
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_unknown_backend_lists_native() -> None:
    with pytest.raises(ValueError, match="native"):
        soft_rank(torch.randn(2, 3), backend="nope")


def test_isotonic_regression_matches_its_statement(path: str) -> None:
    """The ``isotonic`` CVXPY statement (the permutahedron projection's dual) solved directly."""
    y = torch.randn(5, 9, dtype=F64)
    layer = SL.sort_qp_layer("isotonic", 9, 0, "moreau")
    _agree(sort_native.isotonic_regression, layer.solve, y)
    assert gradcheck(sort_native.isotonic_regression, (y.clone().requires_grad_(),))


@pytest.mark.parametrize("n", [1, 2, 5, 47, 49, 300])  # 48: the compiled sort's switch
@pytest.mark.parametrize("kind", ["plain", "ties", "huge"])
def test_compiled_and_torch_paths_agree(n: int, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """numba's loops against the batched torch code on the same inputs: projections (sorted
    and unsorted ``z``, float32 and float64), isotonic regression and top-k, values and
    gradients, to rounding."""
    if sort_native._kernels() is None:
        pytest.skip("numba is not installed")
    x = _inputs(kind, 9, n)
    w = torch.randn(9, n, dtype=F64)
    g = torch.randn(9, n, dtype=F64)
    k = max(1, n // 3)
    fns = {
        "projection": lambda v: sort_native.project_permutahedron(v, w),
        "projection of sorted z": lambda v: sort_native.project_permutahedron(v, w, z_sorted=True),
        "float32": lambda v: sort_native.project_permutahedron(v.float(), w.float()).double(),
        "isotonic": sort_native.isotonic_regression,
        "rank": lambda v: soft_rank(v, 0.7, backend="native"),
    }
    if n > 1:
        fns["topk"] = lambda v: sort_native.topk_projection(v, k) if k < n else v
    xs = {"projection of sorted z": torch.sort(x, dim=-1, descending=True).values}
    for name, f in fns.items():
        out = {}
        for compiled in (True, False):
            monkeypatch.setattr(sort_native, "use_compiled", compiled)
            out[compiled] = _value_and_grad(f, xs.get(name, x), g)
        # rounding of exact methods: relative to the outputs and to n times the inputs
        scale = 1.0 + out[False][0].abs().max().item() + 1e-3 * n * x.abs().max().item()
        tol = (1e-5 if name == "float32" else 1e-12) * scale
        assert torch.allclose(out[True][0], out[False][0], atol=tol, rtol=0), name
        if kind != "ties":  # at ties the two may take different one-sided derivatives
            gtol = 1e-5 if name == "float32" else 1e-9
            assert torch.allclose(out[True][1], out[False][1], atol=gtol, rtol=0), name
