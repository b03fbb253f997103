"""Tests for layers/sort.py: the closed forms (NeuralSort, stochastic NeuralSort, Sinkhorn)
against references, limits, gradients; the modules, the registry and the errors.

Tolerances: NeuralSort and Sinkhorn are plain PyTorch, so their float64 gradchecks use the
default tolerances. The LP relaxations are tested in test_sort_lp.py.
"""

from __future__ import annotations

import pytest
import torch

import layers.sort as S
from layers.sort import (
    SORTS,
    LPBirkhoff,
    LPTopK,
    NeuralSort,
    Sinkhorn,
    SortRelaxation,
    StochasticNeuralSort,
    get_sort,
    lp_birkhoff_sort,
    lp_topk,
    neural_sort,
    sinkhorn_sort,
    soft_rank,
    soft_sort,
    stochastic_neural_sort,
)
from tests.layers.references import distinct, perm_matrix, topk_indicator

# moreau rebuilds its batch solver (and says so) when the batch size changes between calls
pytestmark = pytest.mark.filterwarnings("ignore:Batch size has changed:UserWarning")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test draws the same numbers, whatever runs before it."""
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------


def naive_neural_sort(s: torch.Tensor, tau: float) -> torch.Tensor:
    """The paper's formula with the explicit ``A_s`` matrix."""
    n = s.shape[-1]
    A = (s[..., :, None] - s[..., None, :]).abs()
    r = n + 1 - 2 * torch.arange(1, n + 1, dtype=s.dtype)
    logits = (r[:, None] * s[..., None, :] - A.sum(-1)[..., None, :]) / tau
    return torch.softmax(logits, -1)


def fixed_generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------------------------
# NeuralSort (deterministic)
# ---------------------------------------------------------------------------------------------


def test_neural_sort_matches_paper_formula() -> None:
    s = torch.randn(3, 2, 7, dtype=torch.float64)
    for tau in (0.1, 1.0, 5.0):
        torch.testing.assert_close(neural_sort(s, tau), naive_neural_sort(s, tau))


def test_neural_sort_rows_sum_to_one_and_shapes() -> None:
    s = torch.randn(4, 3, 9)
    P = neural_sort(s, 0.5)
    assert P.shape == (4, 3, 9, 9) and P.dtype == torch.float32
    torch.testing.assert_close(P.sum(-1), torch.ones(4, 3, 9))
    assert neural_sort(torch.randn(5), 1.0).shape == (5, 5)  # unbatched
    assert neural_sort(torch.randn(2, 1), 1.0).shape == (2, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neural_sort_limit_is_the_permutation(dtype: torch.dtype) -> None:
    s = distinct(6, 8, dtype=dtype)
    torch.testing.assert_close(neural_sort(s, 1e-3), perm_matrix(s), atol=1e-6, rtol=0)
    P = NeuralSort(tau=1e-3)
    torch.testing.assert_close(P.topk(s, 3), topk_indicator(s, 3), atol=1e-6, rtol=0)


def test_neural_sort_row_argmax_is_the_sort_at_any_tau() -> None:
    s = torch.randn(20, 10, dtype=torch.float64)
    for tau in (0.01, 1.0, 100.0):
        P = neural_sort(s, tau)
        assert torch.equal(P.argmax(-1), s.argsort(-1, descending=True))


def test_neural_sort_stable_for_large_scores_and_small_tau() -> None:
    s = torch.randn(4, 50) * 1e4
    for tau in (1e-4, 1.0, 1e4):
        P = neural_sort(s, tau)
        assert torch.isfinite(P).all()
        torch.testing.assert_close(P.sum(-1), torch.ones(4, 50))
    torch.testing.assert_close(neural_sort(s, 1e-4), perm_matrix(s))
    # a common shift of 1e6 changes nothing
    s64 = torch.randn(3, 20, dtype=torch.float64)
    torch.testing.assert_close(neural_sort(s64 + 1e6, 0.3), neural_sort(s64, 0.3))


def test_neural_sort_gradcheck() -> None:
    s = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: neural_sort(x, 0.7), (s,))
    assert torch.autograd.gradcheck(lambda x: NeuralSort(0.7).topk(x, 2), (s,))


def test_neural_sort_topk_uses_first_rows() -> None:
    s = torch.randn(3, 12, dtype=torch.float64)
    m = NeuralSort(0.4)
    torch.testing.assert_close(m.topk(s, 4), m(s)[..., :4, :].sum(-2))
    torch.testing.assert_close(m.topk(s, 4).sum(-1), torch.full((3,), 4.0, dtype=s.dtype))


def test_neural_sort_hard_is_straight_through() -> None:
    s = torch.randn(3, 6, dtype=torch.float64)
    w = torch.randn(3, 6, 6, dtype=torch.float64)
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    hard = neural_sort(x1, 0.5, hard=True)
    assert torch.equal(hard, perm_matrix(s))
    (hard * w).sum().backward()
    (neural_sort(x2, 0.5) * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    m = NeuralSort(0.5, hard=True)
    assert torch.equal(m.topk(s, 2), topk_indicator(s, 2))


def test_neural_sort_ties_are_defined() -> None:
    s = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]])
    P = neural_sort(s, 0.1)
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P.sum(-1), torch.ones(1, 5))
    H = neural_sort(s, 0.1, hard=True)
    expected = torch.zeros(1, 5, 5)
    for rank, item in enumerate([1, 2, 4, 0, 3]):  # ties broken by index
        expected[0, rank, item] = 1
    assert torch.equal(H, expected)
    # tied items get the same column
    torch.testing.assert_close(P[..., 1], P[..., 2])


def test_neural_sort_saves_one_n_by_n_tensor() -> None:
    """Memory: the graph keeps one (batch, n, n) tensor, everything else is O(batch * n)."""
    b, n = 4, 64
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    s = torch.randn(b, n, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        P = neural_sort(s, 1.0)
    big = [x for x in saved if x > b * n]
    assert big == [b * n * n], saved
    P.sum().backward()


def test_neural_sort_device_and_dtype_follow_input() -> None:
    for dtype in (torch.float32, torch.float64):
        P = neural_sort(torch.randn(2, 4, dtype=dtype), 1.0)
        assert P.dtype == dtype and P.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_neural_sort_on_cuda() -> None:
    s = torch.randn(3, 7, device="cuda")
    P = neural_sort(s, 0.5)
    assert P.device == s.device
    torch.testing.assert_close(P.cpu(), neural_sort(s.cpu(), 0.5), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# NeuralSort (stochastic)
# ---------------------------------------------------------------------------------------------


def test_stochastic_shapes_and_reproducibility() -> None:
    s = torch.randn(2, 3, 5)
    P = stochastic_neural_sort(s, 0.5, num_samples=4, generator=fixed_generator())
    assert P.shape == (4, 2, 3, 5, 5)
    torch.testing.assert_close(P.sum(-1), torch.ones(4, 2, 3, 5))
    Q = stochastic_neural_sort(s, 0.5, num_samples=4, generator=fixed_generator())
    assert torch.equal(P, Q)
    m = StochasticNeuralSort(0.5, num_samples=3)
    assert m(s).shape == (3, 2, 3, 5, 5) and m.topk(s, 2).shape == (3, 2, 3, 5)


def test_stochastic_honours_tau() -> None:
    s = torch.randn(2, 6, dtype=torch.float64)
    a = stochastic_neural_sort(s, 0.1, 3, generator=fixed_generator())
    b = stochastic_neural_sort(s, 10.0, 3, generator=fixed_generator())
    assert not torch.allclose(a, b)
    # same noise, temperature -> 0: the exact permutation of the perturbed scores
    g = S._gumbel_like((3, *s.shape), s, fixed_generator())
    perturbed = s.unsqueeze(0) + g
    gaps = perturbed.sort(-1).values.diff(dim=-1)
    assert gaps.min() > 1e-3  # well separated, so tau = 1e-5 is far below every gap
    torch.testing.assert_close(
        stochastic_neural_sort(s, 1e-5, 3, generator=fixed_generator()), perm_matrix(perturbed)
    )


def test_stochastic_samples_follow_plackett_luce() -> None:
    """First-ranked item ~ softmax(scores); first two ~ the PL pair probabilities."""
    scores = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    P = stochastic_neural_sort(
        scores, 1e-3, num_samples=4000, hard=True, generator=fixed_generator()
    )
    first = P[:, 0, :].mean(0)
    torch.testing.assert_close(first, torch.softmax(scores, 0), atol=0.03, rtol=0)
    w = scores.exp()
    p01 = (w[0] / w.sum()) * (w[1] / (w[1] + w[2]))
    freq01 = ((P[:, 0, 0] == 1) & (P[:, 1, 1] == 1)).double().mean()
    assert abs(freq01 - p01) < 0.03


def test_stochastic_gradcheck() -> None:
    s = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        return stochastic_neural_sort(x, 0.8, num_samples=2, generator=fixed_generator())

    assert torch.autograd.gradcheck(f, (s,))


# ---------------------------------------------------------------------------------------------
# Sinkhorn
# ---------------------------------------------------------------------------------------------


def test_sinkhorn_doubly_stochastic_and_limit() -> None:
    s = torch.randn(3, 6, dtype=torch.float64)
    P = sinkhorn_sort(s, 1.0, n_iters=300)
    torch.testing.assert_close(P.sum(-1), torch.ones(3, 6, dtype=s.dtype))
    torch.testing.assert_close(P.sum(-2), torch.ones(3, 6, dtype=s.dtype), atol=1e-8, rtol=0)
    d = distinct(4, 6)
    torch.testing.assert_close(sinkhorn_sort(d, 1e-2), perm_matrix(d), atol=1e-6, rtol=0)
    torch.testing.assert_close(Sinkhorn(1e-2).topk(d, 2), topk_indicator(d, 2), atol=1e-6, rtol=0)
    big = torch.randn(3, 30) * 1e3  # float32, large scores, tiny tau: finite and exact
    P = sinkhorn_sort(big, 1e-4)
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P, perm_matrix(big))


def test_sinkhorn_is_the_entropic_birkhoff_lp() -> None:
    """Its limit is the Sinkhorn scaling of exp(r s^T / tau), whatever the start."""
    s = torch.randn(2, 5, dtype=torch.float64)
    tau = 2.0
    r = torch.arange(4, -5, -2, dtype=s.dtype)
    K = (r[:, None] * s[..., None, :] / tau).exp()
    for _ in range(2000):
        K = K / K.sum(-2, keepdim=True)
        K = K / K.sum(-1, keepdim=True)
    torch.testing.assert_close(sinkhorn_sort(s, tau, n_iters=200), K)


def test_sinkhorn_gradcheck_and_hard() -> None:
    s = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn_sort(x, 0.9, n_iters=5), (s,))
    assert torch.equal(sinkhorn_sort(s, 0.9, hard=True), perm_matrix(s.detach()))


# ---------------------------------------------------------------------------------------------
# registry, modules, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SORTS))
def test_registry_topk_contract(name: str) -> None:
    m = get_sort(name, 0.5)
    assert isinstance(m, SortRelaxation)
    x = torch.randn(3, 6, dtype=torch.float64)
    y = m.topk(x, 2)
    lead = (m.num_samples,) if isinstance(m, StochasticNeuralSort) else ()
    assert y.shape == (*lead, 3, 6)
    torch.testing.assert_close(
        y.sum(-1), torch.full((*lead, 3), 2.0, dtype=x.dtype), atol=1e-7, rtol=0
    )
    if name == "lp-topk":
        with pytest.raises(NotImplementedError, match="topk"):
            m(x)
    else:
        P = m(x)
        assert P.shape == (*lead, 3, 6, 6)
        torch.testing.assert_close(
            P.sum(-1), torch.ones(*lead, 3, 6, dtype=x.dtype), atol=1e-7, rtol=0
        )


def test_get_sort_maps_tau_and_kwargs() -> None:
    assert get_sort("lp-topk", 0.25).regularization_strength == 0.25
    m = get_sort("neuralsort-stochastic", 0.3, num_samples=5, hard=True)
    assert (m.tau, m.num_samples, m.hard) == (0.3, 5, True)
    assert get_sort("sinkhorn", 2.0, n_iters=7).n_iters == 7
    with pytest.raises(ValueError, match=r"neuralsort.*lp-birkhoff"):
        get_sort("bogosort")


@pytest.mark.parametrize(
    "call",
    [
        lambda x: neural_sort(x, 0.0),
        lambda x: neural_sort(x, -1.0),
        lambda x: neural_sort(x, float("nan")),
        lambda x: sinkhorn_sort(x, 1.0, n_iters=0),
        lambda x: stochastic_neural_sort(x, 1.0, num_samples=0),
        lambda x: lp_topk(x, 0),
        lambda x: lp_topk(x, 7),
        lambda x: NeuralSort().topk(x, 7),
        lambda x: soft_rank(x, 0.0),
        lambda x: lp_birkhoff_sort(x, -2.0),
        lambda x: NeuralSort(tau=0),
        lambda x: LPTopK(regularization_strength=0),
        lambda x: LPBirkhoff(backend="gurobi"),
    ],
)
def test_bad_arguments_raise_value_error(call) -> None:
    with pytest.raises(ValueError):
        call(torch.randn(2, 6))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_raise(bad: float) -> None:
    x = torch.randn(2, 5)
    x[1, 3] = bad
    for fn in (lambda v: neural_sort(v), lambda v: lp_topk(v, 2), lambda v: soft_sort(v)):
        with pytest.raises(ValueError, match="NaN/Inf"):
            fn(x)


def test_bad_shapes_and_types_raise() -> None:
    with pytest.raises(ValueError, match=r"scores must have shape \(\.\.\., n\), got shape \(\)"):
        neural_sort(torch.tensor(1.0))
    with pytest.raises(ValueError, match="at least one item"):
        neural_sort(torch.randn(3, 0))
    with pytest.raises(TypeError, match="floating"):
        neural_sort(torch.arange(5))
    with pytest.raises(TypeError, match="k must be an int"):
        lp_topk(torch.randn(5), 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="k must be an int"):
        NeuralSort().topk(torch.randn(5), True)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    """Scores near 1e4 overflow half precision's logits: computed in float32, returned in half."""
    x = torch.randn(3, 5) * 1e4
    for fn in (neural_sort, sinkhorn_sort):
        y = fn(x.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert torch.allclose(y.float(), fn(x.to(dtype).float()), atol=1e-2)
    y = stochastic_neural_sort(x.to(dtype), num_samples=2)
    assert y.dtype == dtype and torch.isfinite(y).all()
