"""Bad input, as a matrix: every public layer function x every kind of bad input.

The policy is written in ``layers/_checks.py``: each cell either gives the right result (shape,
dtype, finite values, checked against the float32 / float64 result) or raises one clear error
(the exact exception type and a key phrase of its message). Sizes are tiny (B = 2, n <= 4) so
that the whole matrix runs in seconds; the cvxpylayers backends only see the cheapest cells.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

import layers
from layers import (
    DKNN,
    SORTS,
    CvxpyProblemLayer,
    OptNetQP,
    SolverError,
    TVDenoise,
    get_sort,
    knn_vote,
    lp_birkhoff_sort,
    lp_permutahedron_sort,
    lp_topk,
    nearest_neighbors,
    neural_sort,
    pairwise_sq_dists,
    qp,
    sinkhorn_sort,
    soft_rank,
    soft_sort,
    solve_qp,
    stochastic_neural_sort,
    tv_denoise,
    tv_denoise_2d,
)
from layers.sort_lp import LP_SORT_BACKENDS

QP = importlib.import_module("layers.qp")  # the module (``layers.qp`` is the function)
TV = importlib.import_module("layers.tv")
HAS_QPTH = importlib.util.find_spec("qpth") is not None
HAS_MOREAU = importlib.util.find_spec("moreau") is not None
CVXPY_BACKEND = "diffcp-clarabel"  # the one cvxpylayers backend of the matrix (moreau below)

HALF = [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# The functions: how to build their inputs for a batch B and a size n, and call them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One public function (or module) in the matrix.

    ``make(B, n, dtype)`` builds its inputs; input 0 is the one the bad values go into, named
    ``arg`` in messages. ``call(*inputs)`` returns the output checked. ``out_shape(B, n)`` is
    that output's shape. ``one(inputs)`` is the right output for ``n = 1``. ``floats`` are the
    inputs converted to half precision; gradients are checked for input 0 (unless tagged
    "no-grad").
    ``n0``: "error" (ValueError), "empty" (an empty result) or "construct" (the sizes are fixed
    when the layer is built). ``solvers()``: the ``(object, attribute)`` pairs that a batch of
    size 0 must not reach. ``wrong()``: inputs of a wrong shape, given to ``wrong_call`` (default
    ``call``), and ``wrong_msg`` the error's key phrase.
    """

    make: Callable[[int, int, torch.dtype], list[Tensor]]
    call: Callable[..., Tensor]
    arg: str
    out_shape: Callable[[int, int], tuple[int, ...]]
    one: Callable[[list[Tensor]], Tensor] | None
    floats: tuple[int, ...] = (0,)
    n0: str = "error"
    solvers: Callable[[], list[tuple[Any, str]]] | None = None
    wrong: Callable[[], list[Tensor]] | None = None
    wrong_call: Callable[..., Any] | None = None
    wrong_msg: str = "shape"
    int_out: bool = False
    tags: frozenset[str] = field(default_factory=frozenset)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _scores(B: int, n: int, dtype: torch.dtype) -> list[Tensor]:
    return [torch.randn(B, n, generator=_gen()).to(dtype)]


def _sort_spec(
    fn: Callable[[Tensor], Tensor],
    out: str,
    one: Callable[[Tensor], Tensor],
    tags: Sequence[str] = (),
) -> Spec:
    """A sort relaxation of scores ``(B, n)``; ``out``: "P" (``(B, n, n)``), "v" (``(B, n)``),
    or "SP" / "Sv" (the same with a leading sample dim of 1)."""
    shapes = {
        "P": lambda B, n: (B, n, n),
        "v": lambda B, n: (B, n),
        "SP": lambda B, n: (1, B, n, n),
        "Sv": lambda B, n: (1, B, n),
    }
    return Spec(
        make=_scores,
        call=fn,
        arg="scores",
        out_shape=shapes[out],
        one=lambda xs: one(xs[0]),
        solvers=_lp_solvers if "lp" in tags else None,
        wrong=lambda: [torch.tensor(1.0)],
        wrong_msg=r"must have shape \(\.\.\., n\), got shape \(\)",
        tags=frozenset({"sort", *tags}),
    )


def _lp_solvers() -> list[tuple[Any, str]]:
    """The LP sorts' solvers: native, and the cvxpylayers layers (built on first use)."""
    names = ("topk_projection", "nested_topk_matrix", "birkhoff_projection")
    return [(layers.sort_lp, a) for a in (*names, "project_permutahedron", "_qp_layer")]


def _ones_matrix(x: Tensor) -> Tensor:
    return torch.ones(*x.shape, 1, dtype=x.dtype)


def _values_spec(
    fn: Callable[[Tensor], Tensor], one: Callable[[Tensor], Tensor], tags: Sequence[str] = ()
) -> Spec:
    """soft_sort / soft_rank: ``(B, n)`` values in, ``(B, n)`` out."""
    spec = _sort_spec(fn, "v", one, tags)
    return Spec(**{**spec.__dict__, "arg": "values"})


SPECS: dict[str, Spec] = {
    "neural_sort": _sort_spec(neural_sort, "P", _ones_matrix),
    "stochastic_neural_sort": _sort_spec(
        lambda s: stochastic_neural_sort(s, generator=_gen()), "SP", lambda x: _ones_matrix(x)[None]
    ),
    "sinkhorn_sort": _sort_spec(sinkhorn_sort, "P", _ones_matrix),
    "soft_sort": _values_spec(soft_sort, lambda x: x, ["lp"]),
    "soft_rank": _values_spec(soft_rank, torch.ones_like, ["lp"]),
    "lp_topk": _sort_spec(lambda s: lp_topk(s, 1), "v", torch.ones_like, ["lp"]),
    "lp_permutahedron_sort": _sort_spec(lp_permutahedron_sort, "P", _ones_matrix, ["lp"]),
    "lp_birkhoff_sort": _sort_spec(lp_birkhoff_sort, "P", _ones_matrix, ["lp"]),
}
for _name in SORTS:  # the SortRelaxation classes, through get_sort
    _shape = "SP" if _name == "neuralsort-stochastic" else "P"
    _stoch = _name == "neuralsort-stochastic"  # a fresh generator per call: the same noise
    _tags = ["lp"] if _name.startswith("lp-") else []
    if _name != "lp-topk":
        SPECS[f"get_sort({_name!r})"] = _sort_spec(
            lambda s, _n=_name, _g=_stoch: get_sort(_n, **({"generator": _gen()} if _g else {}))(s),
            _shape,
            _ones_matrix,
            _tags,
        )
    SPECS[f"get_sort({_name!r}).topk"] = _sort_spec(
        lambda s, _n=_name, _g=_stoch: get_sort(_n, **({"generator": _gen()} if _g else {})).topk(
            s, 1
        ),
        "Sv" if _name == "neuralsort-stochastic" else "v",
        (lambda x: torch.ones_like(x)[None])
        if _name == "neuralsort-stochastic"
        else torch.ones_like,
        _tags,
    )
for _be in [CVXPY_BACKEND] + (["moreau"] if HAS_MOREAU else []):  # the LP sorts on cvxpylayers
    SPECS[f"lp_topk[{_be}]"] = _sort_spec(
        lambda s, _b=_be: lp_topk(s, 1, backend=_b), "v", torch.ones_like, ["lp", "cvxpy"]
    )
    SPECS[f"lp_permutahedron_sort[{_be}]"] = _sort_spec(
        lambda s, _b=_be: lp_permutahedron_sort(s, backend=_b), "P", _ones_matrix, ["lp", "cvxpy"]
    )
    SPECS[f"lp_birkhoff_sort[{_be}]"] = _sort_spec(
        lambda s, _b=_be: lp_birkhoff_sort(s, backend=_b), "P", _ones_matrix, ["lp", "cvxpy"]
    )
    SPECS[f"soft_sort[{_be}]"] = _values_spec(
        lambda s, _b=_be: soft_sort(s, backend=_b), lambda x: x, ["lp", "cvxpy"]
    )
    SPECS[f"soft_rank[{_be}]"] = _values_spec(
        lambda s, _b=_be: soft_rank(s, backend=_b), torch.ones_like, ["lp", "cvxpy"]
    )


# kNN: B queries, n candidates (or n neighbours for knn_vote), 2 features.
def _points(B: int, n: int, dtype: torch.dtype) -> list[Tensor]:
    g = _gen()
    return [torch.randn(B, 2, generator=g).to(dtype), torch.randn(n, 2, generator=g).to(dtype)]


def _votes(B: int, n: int, dtype: torch.dtype) -> list[Tensor]:
    g = _gen()
    dists = torch.rand(B, n, generator=g).to(dtype) + 0.1
    return [dists, torch.randint(0, 3, (B, n), generator=g)]


SPECS.update(
    {
        "pairwise_sq_dists": Spec(
            make=_points,
            call=pairwise_sq_dists,
            arg="x",
            out_shape=lambda B, n: (B, n),
            one=lambda xs: (xs[0] - xs[1]).pow(2).sum(-1, keepdim=True),
            floats=(0, 1),
            n0="empty",
            wrong=lambda: [torch.randn(2, 2), torch.randn(3, 3)],
            wrong_msg=r"same number of features.*\(2, 2\) and \(3, 3\)",
        ),
        "nearest_neighbors": Spec(
            make=_points,
            call=lambda q, c: nearest_neighbors(q, c, 1)[0],
            arg="queries",
            out_shape=lambda B, n: (B, 1),
            one=lambda xs: (xs[0] - xs[1]).norm(dim=-1, keepdim=True),
            floats=(0, 1),
            wrong=lambda: [torch.randn(2, 2), torch.randn(3, 3)],
            wrong_msg=r"same number of features.*\(2, 2\) and \(3, 3\)",
            tags=frozenset({"no-grad"}),
        ),
        "knn_vote": Spec(
            make=_votes,
            call=lambda d, lab: knn_vote(lab, d, 3, "distance"),
            arg="neighbor_dists",
            out_shape=lambda B, n: (B,),
            one=lambda xs: xs[1][:, 0],
            wrong=lambda: [torch.rand(2, 3), torch.zeros(2, 2, dtype=torch.long)],
            wrong_msg=r"neighbor_labels has shape \(2, 2\) but neighbor_dists \(2, 3\)",
            int_out=True,
            tags=frozenset({"no-grad"}),
        ),
        "DKNN": Spec(
            make=_points,
            call=lambda q, c: DKNN(1)(q, c),
            arg="queries",
            out_shape=lambda B, n: (B, n),
            one=lambda xs: torch.ones(xs[0].shape[0], 1),
            floats=(0, 1),
            wrong=lambda: [torch.randn(2, 2), torch.randn(3, 3)],
            wrong_msg=r"same number of features.*\(2, 2\) and \(3, 3\)",
        ),
        "DKNN(lp-topk)": Spec(
            make=_points,
            call=lambda q, c: DKNN(1, sort="lp-topk")(q, c),
            arg="queries",
            out_shape=lambda B, n: (B, n),
            one=lambda xs: torch.ones(xs[0].shape[0], 1),
            floats=(0, 1),
            wrong=lambda: [torch.randn(2, 2), torch.randn(3, 3)],
            wrong_msg=r"same number of features.*\(2, 2\) and \(3, 3\)",
        ),
    }
)


# QP: min 1/2 |x|^2 + q'x  s.t.  -1 <= sum(x) <= 1, batched; n = 1 gives x = clip(-q, -1, 1).
def _qp_data(B: int, n: int, dtype: torch.dtype) -> list[Tensor]:
    q = 2 * torch.randn(B, n, generator=_gen())
    Q = torch.eye(n).expand(B, n, n).clone()
    G = torch.cat([torch.ones(B, 1, n), -torch.ones(B, 1, n)], 1)
    h = torch.ones(B, 2)
    return [t.to(dtype) for t in (q, Q, G, h)]


def _qp_one(xs: list[Tensor]) -> Tensor:
    return (-xs[0]).clamp(-1, 1)


def _qp_wrong() -> list[Tensor]:
    q, _, G, h = _qp_data(2, 3, torch.float32)
    return [q, torch.eye(4).expand(2, 4, 4), G, h]


def _optnet(n: int) -> OptNetQP:
    torch.manual_seed(0)
    return OptNetQP(n, 2)


SPECS.update(
    {
        "qp": Spec(
            make=_qp_data,
            call=lambda q, Q, G, h: qp(Q, q, G, h),
            arg="q",
            out_shape=lambda B, n: (B, n),
            one=_qp_one,
            floats=(0, 1, 2, 3),
            solvers=lambda: [(QP, "solve_checked")],
            wrong=_qp_wrong,
            wrong_msg=r"Q has shape \(2, 4, 4\), expected \(batch\?, 3, 3\)",
        ),
        "solve_qp": Spec(
            make=_qp_data,
            call=lambda q, Q, G, h: solve_qp(Q, q, G, h).x,
            arg="q",
            out_shape=lambda B, n: (B, n),
            one=_qp_one,
            floats=(0, 1, 2, 3),
            solvers=lambda: [(layers.qp_ipm, "_solve_qp")],
            wrong=_qp_wrong,
            wrong_msg=r"Q has shape \(2, 4, 4\), expected \(2, 3, 3\)",
            tags=frozenset({"no-grad", "float64-out"}),
        ),
        "OptNetQP": Spec(
            make=lambda B, n, dtype: _qp_data(B, n, dtype)[:1],
            call=lambda q: _optnet(q.shape[-1])(q),
            arg="q",
            out_shape=lambda B, n: (B, n),
            one=None,
            solvers=lambda: [(QP, "solve_checked")],
            wrong=lambda: [torch.randn(2, 3)[..., None]],
            wrong_msg=r"q has shape \(2, 3, 1\), expected \(1,\) or \('B', 1\)",
        ),
    }
)
if HAS_QPTH:
    SPECS["qp[qpth]"] = Spec(
        **{**SPECS["qp"].__dict__, "call": lambda q, Q, G, h: qp(Q, q, G, h, backend="qpth")}
    )


# TV: y (B, n), first differences; n = 1 has no differences, so x = y.
def _tv_data(B: int, n: int, dtype: torch.dtype) -> list[Tensor]:
    eye = torch.eye(n)
    D = eye[:-1] - eye[1:] if n else torch.zeros(0, 0)
    return [torch.randn(B, n, generator=_gen()).to(dtype), D.to(dtype)]


SPECS.update(
    {
        "tv_denoise": Spec(
            make=_tv_data,
            call=lambda y, D: tv_denoise(y, D, 0.5),
            arg="y",
            out_shape=lambda B, n: (B, n),
            one=lambda xs: xs[0],
            floats=(0, 1),
            solvers=lambda: [(TV, "_solve")],
            wrong=lambda: [torch.randn(2, 5), torch.randn(4, 4)],
            wrong_msg=r"D has 4 columns but the signals have length 5; D must be \(m, 5\)",
        ),
        "tv_denoise_2d": Spec(
            make=lambda B, n, dtype: [torch.randn(B, 1, n, generator=_gen()).to(dtype)],
            call=lambda im: tv_denoise_2d(im, 0.5),
            arg="images",
            out_shape=lambda B, n: (B, 1, n),
            one=lambda xs: xs[0],
            solvers=lambda: [(TV, "_solve")],
            wrong=lambda: [torch.randn(5)],
            wrong_msg=r"images must have shape \(H, W\) or \(B, H, W\), got shape \(5,\)",
        ),
        "TVDenoise": Spec(
            make=lambda B, n, dtype: [torch.randn(B, n, generator=_gen()).to(dtype)],
            call=lambda y: TVDenoise(y.shape[-1])(y),
            arg="y",
            out_shape=lambda B, n: (B, n),
            one=lambda xs: xs[0],
            solvers=lambda: [(TV, "_solve")],
            wrong=lambda: [torch.tensor(1.0)],
            wrong_call=lambda y: TVDenoise(3)(y),
            wrong_msg=r"expected signals of length 3, got shape \(\)",
        ),
    }
)


# CvxpyProblemLayer: min |x - b|^2 (unconstrained) and with x >= 0, b a batched parameter.
_CVX_LAYERS: dict[tuple[str, int, str], CvxpyProblemLayer] = {}


def _cvx_layer(kind: str, n: int, backend: str) -> CvxpyProblemLayer:
    key = (kind, n, backend)
    if key not in _CVX_LAYERS:
        import cvxpy as cp

        x, b = cp.Variable(n), cp.Parameter(n)
        cons = [x >= 0] if kind == "ineq" else []
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - b)), cons)
        _CVX_LAYERS[key] = CvxpyProblemLayer(prob, [b], [x], backend=backend)
    return _CVX_LAYERS[key]


def _cvx_spec(kind: str, backend: str) -> Spec:
    def call(b: Tensor) -> Tensor:
        return _cvx_layer(kind, b.shape[-1], backend)(b)[0]

    return Spec(
        make=lambda B, n, dtype: [torch.randn(B, n, generator=_gen()).to(dtype)],
        call=call,
        arg=r"parameter 0 \(param\d+\)",
        out_shape=lambda B, n: (B, n),
        one=(lambda xs: xs[0].clamp_min(0)) if kind == "ineq" else (lambda xs: xs[0]),
        n0="construct",
        solvers=lambda: [(_cvx_layer(kind, 3, backend).layer, "forward")],
        wrong=lambda: [torch.randn(2, 3, 1)],
        wrong_call=lambda b: _cvx_layer(kind, 3, backend)(b),
        wrong_msg=r"parameter 0.*got shapes \[\(2, 3, 1\)\], expected \[\(3,\)\]",
        tags=frozenset({"cvxpy"} if backend != "torch-ipm" else set()),
    )


SPECS.update(
    {
        "CvxpyProblemLayer[torch-ipm]": _cvx_spec("ls", "torch-ipm"),
        "CvxpyProblemLayer[torch-ipm, x >= 0]": _cvx_spec("ineq", "torch-ipm"),
        f"CvxpyProblemLayer[{CVXPY_BACKEND}]": _cvx_spec("ls", CVXPY_BACKEND),
        f"CvxpyProblemLayer[{CVXPY_BACKEND}, x >= 0]": _cvx_spec("ineq", CVXPY_BACKEND),
    }
)
if HAS_MOREAU:
    SPECS["CvxpyProblemLayer[moreau, x >= 0]"] = _cvx_spec("ineq", "moreau")

NAMES = list(SPECS)
FAST = [k for k in NAMES if "cvxpy" not in SPECS[k].tags]


def _no_solve(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a solver was called for an empty batch")


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------------------------
# The columns
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", NAMES)
def test_nan_and_inf_are_refused_naming_the_argument(name: str, bad: float) -> None:
    spec = SPECS[name]
    xs = spec.make(2, 3, torch.float32)
    xs[0] = xs[0].clone()
    xs[0].view(-1)[0] = bad
    with pytest.raises(ValueError, match=rf"{spec.arg} has 1 NaN/Inf entries; clean the input"):
        spec.call(*xs)


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_is_computed_in_float32_and_returned_in_half(
    name: str, dtype: torch.dtype
) -> None:
    spec = SPECS[name]
    xs = spec.make(2, 4, torch.float32)
    half = [t.to(dtype) if i in spec.floats else t for i, t in enumerate(xs)]
    out = _first(spec.call(*half))
    ref = _first(spec.call(*[t.float() if i in spec.floats else t for i, t in enumerate(half)]))
    assert out.shape == ref.shape == spec.out_shape(2, 4)
    if spec.int_out:
        assert torch.equal(out, ref)
        return
    want = torch.float64 if "float64-out" in spec.tags else dtype
    assert out.dtype == want and torch.isfinite(out).all()
    eps = torch.finfo(dtype).eps
    assert torch.allclose(out.double(), ref.double(), rtol=2 * eps, atol=2 * eps), (out, ref)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("name", FAST)
def test_integer_and_bool_inputs_say_to_convert(name: str, dtype: torch.dtype) -> None:
    spec = SPECS[name]
    xs = spec.make(2, 3, torch.float32)
    xs[0] = (xs[0] > 0).to(dtype) if dtype == torch.bool else (10 * xs[0]).to(dtype)
    with pytest.raises(
        TypeError, match=rf"{spec.arg} must be a floating-point tensor.*\.float\(\)"
    ):
        spec.call(*xs)


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_gives_empty_outputs_without_a_solve(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = SPECS[name]
    xs = spec.make(0, 3, torch.float32)
    if "no-grad" not in spec.tags:
        xs[0].requires_grad_()
    for obj, attr in spec.solvers() if spec.solvers is not None else []:
        monkeypatch.setattr(obj, attr, _no_solve)
    out = _first(spec.call(*xs))
    assert out.shape == spec.out_shape(0, 3)
    if spec.int_out:
        assert out.dtype == torch.long
        return
    assert out.dtype == (torch.float64 if "float64-out" in spec.tags else torch.float32)
    if xs[0].requires_grad:
        out.sum().backward()
        assert xs[0].grad is not None and xs[0].grad.shape == xs[0].shape


_MISSING = {"qpth": not HAS_QPTH, "moreau": not HAS_MOREAU}


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            b, marks=pytest.mark.skipif(_MISSING.get(b, False), reason=f"{b} is not installed")
        )
        for b in LP_SORT_BACKENDS
    ],
)
def test_empty_batch_on_every_lp_sort_backend(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every LP sort on every backend answers B = 0 with empty outputs, without a solve."""
    for obj, attr in _lp_solvers():
        monkeypatch.setattr(obj, attr, _no_solve)
    calls = {
        (0, 3): [
            lambda s: lp_topk(s, 1, backend=backend),
            lambda s: soft_sort(s, backend=backend),
            lambda s: soft_rank(s, backend=backend),
            lambda s: get_sort("lp-permutahedron", backend=backend).topk(s, 2),
        ],
        (0, 3, 3): [
            lambda s: lp_permutahedron_sort(s, backend=backend),
            lambda s: lp_birkhoff_sort(s, backend=backend),
        ],
    }
    for shape, fns in calls.items():
        for fn in fns:
            x = torch.randn(0, 3, dtype=torch.float64, requires_grad=True)
            out = fn(x)
            assert out.shape == shape and out.dtype == torch.float64
            out.sum().backward()
            assert x.grad is not None and x.grad.shape == (0, 3)


@pytest.mark.parametrize("name", NAMES)
def test_no_items_say_at_least_one_is_needed(name: str) -> None:
    spec = SPECS[name]
    if spec.n0 == "construct":  # a CVXPY problem fixes its sizes when it is built
        with pytest.raises(ValueError, match="at least one entry"):
            _cvx_layer("ls", 0, "torch-ipm")
        return
    xs = spec.make(2, 0, torch.float32)
    if spec.n0 == "empty":  # solves nothing: the empty answer
        assert _first(spec.call(*xs)).shape == spec.out_shape(2, 0)
        return
    with pytest.raises(ValueError, match=r"at least one|>= 1"):
        spec.call(*xs)


@pytest.mark.parametrize("name", NAMES)
def test_one_item_gives_the_trivial_result_and_finite_gradients(name: str) -> None:
    spec = SPECS[name]
    xs = spec.make(2, 1, torch.float64)
    if "no-grad" not in spec.tags:
        xs[0].requires_grad_()
    out = _first(spec.call(*xs))
    assert out.shape == spec.out_shape(2, 1)
    if spec.one is not None:
        want = spec.one([t.detach() for t in xs])
        assert torch.allclose(out.detach().double(), want.double(), atol=1e-6), (out, want)
    if xs[0].requires_grad:
        out.sum().backward()
        assert torch.isfinite(xs[0].grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_wrong_shapes_name_the_argument_and_shapes(name: str) -> None:
    spec = SPECS[name]
    assert spec.wrong is not None
    with pytest.raises(ValueError, match=spec.wrong_msg):
        (spec.wrong_call or spec.call)(*spec.wrong())


@pytest.mark.parametrize("name", NAMES)
def test_meta_tensors_are_refused_at_the_input_check(name: str) -> None:
    spec = SPECS[name]
    xs = spec.make(2, 3, torch.float32)
    xs[0] = torch.empty_like(xs[0], device="meta")
    with pytest.raises(ValueError, match=rf"{spec.arg} is a meta tensor.*cannot be solved"):
        spec.call(*xs)


# ---------------------------------------------------------------------------------------------
# Huge finite values: the right result, or an error saying the values are too large
# ---------------------------------------------------------------------------------------------

HUGE = [(1e30, torch.float32), (1e300, torch.float64)]
HUGE_IDS = ["1e30-float32", "1e300-float64"]
SORT_NAMES = [k for k in NAMES if "sort" in SPECS[k].tags]


def _hard_permutation(x: Tensor) -> Tensor:
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    return torch.zeros(*x.shape, x.shape[-1], dtype=torch.float64).scatter_(
        -1, order.unsqueeze(-1), 1.0
    )


@pytest.mark.parametrize(("scale", "dtype"), HUGE, ids=HUGE_IDS)
@pytest.mark.parametrize("name", SORT_NAMES)
def test_huge_scores_give_the_hard_sort(name: str, scale: float, dtype: torch.dtype) -> None:
    """At scale 1e30 (or 1e300) a relaxation at temperature 1 is the hard sort: permutation
    matrices whose rows sum to 1, ranks in [1, n], the top-1 indicator; soft_sort is
    scale-equivariant (``soft_sort(c x, eps) = c soft_sort(x, c eps)``): nearly the mean."""
    (x,) = _scores(2, 4, torch.float64)
    xs = (x * scale).to(dtype).requires_grad_()
    out = _first(SPECS[name].call(xs))
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(xs.grad).all()
    got = out.detach().double()
    if name.startswith("soft_sort"):
        ref = soft_sort(x, regularization_strength=scale) * scale
        assert torch.allclose(ref / scale, x.mean(-1, keepdim=True).expand(2, 4), atol=1e-6)
        assert torch.allclose(got / scale, ref / scale, atol=1e-6)
    elif name.startswith("soft_rank"):
        ranks = torch.argsort(torch.argsort(x, -1), -1).double() + 1
        tol = 1e-4 if "cvxpy" in SPECS[name].tags else 1e-6  # the solvers' accuracy
        assert torch.allclose(got, ranks, atol=tol) and got.min() >= 1 - tol
        assert got.max() <= 4 + tol
    elif name.endswith(".topk") or name.startswith("lp_topk"):
        top1 = _hard_permutation(x)[..., 0, :]
        assert torch.allclose(got.reshape(top1.shape), top1, atol=1e-6)
    else:
        P = got.reshape(-1, 2, 4, 4)[0]  # the stochastic ones: the noise is negligible here
        assert torch.allclose(P.sum(-1), torch.ones(2, 4, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(P, _hard_permutation(x), atol=1e-6)


def test_float32_scores_near_its_largest_value_compute_in_float64() -> None:
    """1e38: the logits ``8 n spread / tau`` overflow float32 (NaN before); float64 is used."""
    (x,) = _scores(2, 4, torch.float32)
    for fn in (neural_sort, sinkhorn_sort, lambda s: stochastic_neural_sort(s)[0]):
        P = fn(x * 1e38)
        assert P.dtype == torch.float32 and torch.isfinite(P).all()
        assert torch.allclose(P.double(), _hard_permutation(x.double()), atol=1e-6)
    with pytest.raises(ValueError, match="overflow float64; scale the scores down or raise tau"):
        neural_sort(torch.tensor([[1e307, -1e307, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize(("scale", "dtype"), HUGE, ids=HUGE_IDS)
def test_huge_points_knn(scale: float, dtype: torch.dtype) -> None:
    """Squared distances of 1e30 points overflow: pairwise_sq_dists and DKNN say so;
    nearest_neighbors rescales and finds the neighbours; knn_vote weighs huge distances."""
    q, c = _points(3, 5, torch.float64)
    Q, C = (q * scale).to(dtype), (c * scale).to(dtype)
    for call in (lambda: pairwise_sq_dists(Q, C), lambda: DKNN(1)(Q, C)):
        with pytest.raises(ValueError, match=r"distances overflow.*scale the inputs down"):
            call()
    d, i = nearest_neighbors(Q, C, 2)
    d_ref, i_ref = nearest_neighbors(q, c, 2)
    assert d.dtype == dtype and torch.equal(i, i_ref)
    assert torch.allclose(d.double() / scale, d_ref, rtol=1e-5)
    dists, labels = _votes(3, 4, torch.float64)
    want = knn_vote(labels, dists, 3, "distance")
    assert torch.equal(knn_vote(labels, (dists * scale).to(dtype), 3, "distance"), want)


@pytest.mark.parametrize("backend", ["torch-ipm"] + (["qpth"] if HAS_QPTH else []))
@pytest.mark.parametrize(("scale", "dtype"), HUGE, ids=HUGE_IDS)
def test_huge_qp_data(backend: str, scale: float, dtype: torch.dtype) -> None:
    """``q, h`` scaled by ``c`` scale the solution by ``c``: torch-ipm solves such data at unit
    scale (``x = beta y``) and gives it, with finite gradients; qpth gives it or a SolverError
    that says to rescale."""
    q, Q, G, h = _qp_data(2, 3, torch.float64)
    x1 = qp(Q, q, G, h)
    Qc, qc, Gc, hc = (t.to(dtype) for t in (Q, q * scale, G, h * scale))
    qc.requires_grad_()
    try:
        x = qp(Qc, qc, Gc, hc, backend=backend)
    except SolverError as err:
        assert backend == "qpth"
        assert "rescale the problem so its data are of order 1" in str(err)
    else:
        assert x.dtype == dtype and torch.allclose(x.double() / scale, x1, atol=1e-5)
        x.sum().backward()
        assert torch.isfinite(qc.grad).all()
    sol = solve_qp(Qc, qc.detach(), Gc, hc)
    assert bool(sol.info.ok.all()) and torch.allclose(sol.x / scale, x1, atol=1e-5)


@pytest.mark.parametrize(("scale", "dtype"), HUGE, ids=HUGE_IDS)
def test_huge_input_of_optnet(scale: float, dtype: torch.dtype) -> None:
    """Only ``q`` huge (``h`` of order 1): ``x(c q, h) = c x(q, h / c)``."""
    q = _qp_data(2, 3, torch.float64)[0]
    layer = _optnet(3)
    x = layer((q * scale).to(dtype))
    d = layer.qp_data(q.to(dtype).double())
    ref = qp(d["Q"], q, d["G"], d["h"] / scale)
    assert x.dtype == dtype and torch.allclose(x.detach().double() / scale, ref, atol=1e-5)


@pytest.mark.parametrize("backend", ["native", "qp"])
@pytest.mark.parametrize(("scale", "dtype"), HUGE, ids=HUGE_IDS)
def test_huge_signals_tv(backend: str, scale: float, dtype: torch.dtype) -> None:
    """``tv(c y, lam) = c tv(y, lam / c)``: given at any scale (the certificate, whose duality
    gap grows as ``c**2``, is computed at unit scale)."""
    y, D = _tv_data(2, 5, torch.float64)
    lam_c = torch.tensor(0.5 / scale, dtype=torch.float64)
    ref = tv_denoise(y, D, lam_c) * scale
    x = tv_denoise((y * scale).to(dtype), D.to(dtype), 0.5, backend=backend)
    assert x.dtype == dtype and torch.allclose(x.double() / scale, ref / scale, atol=1e-6)
    x2 = tv_denoise_2d((y * scale).to(dtype).unsqueeze(1), 0.5, backend=backend)
    assert torch.allclose(x2.double().squeeze(1) / scale, ref / scale, atol=1e-6)
    x3 = TVDenoise(5, lam=0.5, backend=backend)((y * scale).to(dtype))
    assert torch.allclose(x3.detach().double() / scale, ref / scale, atol=1e-6)


CVX_NAMES = [k for k in NAMES if k.startswith("CvxpyProblemLayer")]


@pytest.mark.parametrize(("scale", "dtype"), HUGE, ids=HUGE_IDS)
@pytest.mark.parametrize("name", CVX_NAMES)
def test_huge_cvxpy_parameters(name: str, scale: float, dtype: torch.dtype) -> None:
    """A CVXPY problem is not scale invariant in general: the right result or a SolverError
    that says to rescale; and the layer solves ordinary data again afterwards."""
    spec = SPECS[name]
    (b,) = spec.make(2, 3, torch.float64)
    want = spec.one([b * scale])
    try:
        out = spec.call((b * scale).to(dtype))
    except SolverError as err:
        assert "rescale the problem so its data are of order 1" in str(err)
    else:
        assert out.dtype == dtype and torch.allclose(out.double() / scale, want / scale, atol=1e-5)
    assert torch.allclose(spec.call(b.float()).double(), spec.one([b]), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The fixes named in the issue
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_QPTH, reason="qpth is not installed")
def test_qpth_names_exactly_the_infeasible_element() -> None:
    """qpth solves the batch as one system, so element 1 (x0 <= -1 and x0 >= 1) spoiled element
    0's answer too and ``failed`` was [0, 1]; torch-ipm names [1], and now qpth does too."""
    q, Q, G, h = _qp_data(3, 3, torch.float64)
    G = torch.cat([G, torch.eye(3, dtype=torch.float64)[:2].expand(3, 2, 3)], 1)
    h = torch.cat([h, torch.full((3, 2), 10.0, dtype=torch.float64)], 1)  # x0, x1 <= 10
    G[1, 3], h[1, 2:] = -G[1, 2], -1.0  # element 1: x0 <= -1 and x0 >= 1
    for backend in ("torch-ipm", "qpth"):
        with pytest.raises(SolverError, match=r"elements \[1\]") as err:
            qp(Q, q, G, h, backend=backend)
        assert err.value.failed == [1], backend
    assert torch.isfinite(qp(Q[[0, 2]], q[[0, 2]], G[[0, 2]], h[[0, 2]], backend="qpth")).all()


def test_optnet_computes_half_precision_in_float32() -> None:
    """OptNetQP's parameters are float32: float16 input gave an addmv dtype error, float64
    input one from its float32 G; now the data are built in float32 (float64) and the
    output comes back in the input's dtype."""
    q = _qp_data(2, 3, torch.float32)[0]
    ref = _optnet(3)(q)
    for dtype in HALF:
        x = _optnet(3)(q.to(dtype))
        assert x.dtype == dtype and torch.allclose(x.float(), ref, atol=2e-2)
    assert _optnet(3)(q.double()).dtype == torch.float64


@pytest.mark.skipif(not HAS_MOREAU, reason="moreau is not installed")
def test_moreau_recovers_after_a_failed_solve() -> None:
    """A failed moreau solve left its cached solver broken: every later call failed too."""
    layer = _cvx_layer("ls", 3, "moreau")
    b = _scores(2, 3, torch.float64)[0]
    with pytest.raises(SolverError):
        layer(b * 1e300)
    assert torch.allclose(layer(b)[0], b, atol=1e-6)
