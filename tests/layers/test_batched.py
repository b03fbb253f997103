"""layers/_batched.py: batched linear algebra, the step to the boundary, thread control."""

from __future__ import annotations

import math

import pytest
import torch

from layers._batched import add_diag, amax, chol_solve, dot, max_step, one_thread, threads_for

F64 = torch.float64


def test_column_helpers():
    v = torch.tensor([[[1.0], [-3.0]], [[0.5], [2.0]]], dtype=F64)  # (B=2, k=2, 1)
    assert amax(v).flatten().tolist() == [3.0, 2.0]
    assert amax(v[:, :0]).shape == (2, 1, 1) and amax(v[:, :0]).abs().sum() == 0
    assert dot(v, v).flatten().tolist() == [10.0, 4.25]
    M = torch.zeros(2, 2, 2, dtype=F64)
    out = add_diag(M, torch.tensor([1.0, 2.0], dtype=F64).view(2, 1, 1))
    assert torch.equal(out[1], 2 * torch.eye(2, dtype=F64)) and M.abs().sum() == 0


def test_chol_solve():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(3, 4, 4, dtype=F64, generator=g)
    K = F @ F.mT + torch.eye(4, dtype=F64)
    r = torch.randn(3, 4, dtype=F64, generator=g)
    x = chol_solve(torch.linalg.cholesky(K), r)
    torch.testing.assert_close(x, torch.linalg.solve(K, r))


def test_max_step_columns_and_rows():
    v = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], dtype=F64)
    dv = torch.tensor([[-2.0, -1.0, 1.0], [0.0, 1.0, 2.0]], dtype=F64)
    # rows (TV): 0.5 for the first element; no decreasing entry in the second -> cap
    rows = max_step(v, dv, dim=-1, cap=math.inf)
    assert rows.shape == (2, 1) and rows.flatten().tolist() == [0.5, math.inf]
    # columns (QP): the same numbers, capped at 1e30
    cols = max_step(v.unsqueeze(-1), dv.unsqueeze(-1))
    assert cols.shape == (2, 1, 1) and cols.flatten().tolist() == [0.5, 1e30]
    # a NaN in the direction propagates (callers treat a non-finite step as failed)
    dv[0, 2] = math.nan
    assert math.isnan(max_step(v, dv, dim=-1, cap=math.inf)[0, 0].item())


def test_thread_control_restores_the_count():
    before = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with threads_for(2, 3, 0, torch.device("cpu")):
        assert torch.get_num_threads() == 1
    with threads_for(10_000, 100, 0, torch.device("cpu")):  # large: threads untouched
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_finite_check_finds_one_bad_entry(dtype, bad):
    """``check_finite`` (one ``aminmax`` pass) finds a single NaN, +Inf or -Inf anywhere in a
    large tensor, passes finite ones (including the dtype's extremes) and empty ones."""
    from layers._checks import check_finite

    x = torch.randn(3, 50, 70).to(dtype)
    x[0, 0, 0] = torch.finfo(dtype).max
    x[0, 0, 1] = torch.finfo(dtype).min
    if bad is None:
        check_finite("x", x)
        check_finite("x", x[:0])
        return
    for where in [(0, 0, 2), (2, 49, 69), (1, 17, 33)]:
        y = x.clone()
        y[where] = bad
        with pytest.raises(ValueError, match="x has 1 NaN/Inf entries"):
            check_finite("x", y)
