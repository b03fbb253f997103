"""layers/backends.py: the backend table, the single source of every backend's settings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from layers import (
    BACKENDS,
    DEFAULT_BACKEND,
    CvxpyProblemLayer,
    OptNetQP,
    SolverError,
    get_backend,
    qp,
    tv_denoise,
)
from layers.backends import SETTINGS, check_settings
from layers.sort_lp import sort_qp_layer


def test_table():
    assert DEFAULT_BACKEND in BACKENDS
    for name, b in BACKENDS.items():
        assert b.kind in {"torch", "cvxpylayers", "qpth", "proxsuite"}
        assert b.name == name and b.about
        assert 0 < b.check_tol <= 1e-5
    # diffcp rejects ``mode`` when no gradient is needed
    assert "mode" not in BACKENDS["diffcp-clarabel"].solver_args("accurate", needs_grad=False)
    assert BACKENDS["diffcp-clarabel"].solver_args("accurate", needs_grad=True)["mode"] == "lsqr"
    # moreau must use its interior point: 'auto' picks the active-set method for small QPs
    assert BACKENDS["moreau"].accurate["solver"] == "ipm"


def test_get_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'nope'; choose one of torch-ipm"):
        get_backend("nope")
    fake = dataclasses.replace(BACKENDS["diffcp-ecos"], needs="optlayers_missing_pkg")
    monkeypatch.setitem(BACKENDS, "diffcp-ecos", fake)
    with pytest.raises(ImportError, match="pip install optlayers_missing_pkg"):
        get_backend("diffcp-ecos")


def test_settings_are_accurate_or_defaults():
    assert SETTINGS == ("accurate", "defaults")
    for b in BACKENDS.values():
        assert b.solver_args("defaults", needs_grad=True) == b.solver_defaults
        assert check_settings("accurate") == "accurate"
    msg = "settings must be 'accurate' .* or 'defaults' .*, got 'tuned'"
    with pytest.raises(ValueError, match=msg):
        BACKENDS["torch-ipm"].solver_args("tuned", needs_grad=True)
    Q, q = torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    y, D = torch.zeros(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64)[:4]
    for call in (
        lambda: qp(Q, q, settings="tuned"),
        lambda: OptNetQP(2, 1, settings=True),
        lambda: tv_denoise(y, D, 1.0, settings="fast"),
        lambda: sort_qp_layer("topk", 3, 1, "diffcp-clarabel", settings="x"),
        lambda: CvxpyProblemLayer(None, [], [], settings="x"),
    ):
        with pytest.raises(ValueError, match="settings must be 'accurate'"):
            call()


def test_torch_ipm_reads_its_settings_from_the_table(monkeypatch):
    """qp's IPM runner takes tol and max_iter from BACKENDS["torch-ipm"] (accurate or
    solver_defaults), not from constants of its own."""
    torch.manual_seed(0)
    F = torch.randn(4, 4, dtype=torch.float64)
    Q, q = F @ F.mT + torch.eye(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    G, h = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    qp(Q, q, G, h)
    b = BACKENDS["torch-ipm"]
    monkeypatch.setitem(BACKENDS, "torch-ipm", dataclasses.replace(b, accurate={"max_iter": 1}))
    with pytest.raises(SolverError, match="iteration limit"):
        qp(Q, q, G, h)
    qp(Q, q, G, h, settings="defaults")  # solver_defaults are unchanged
    monkeypatch.setitem(
        BACKENDS, "torch-ipm", dataclasses.replace(b, solver_defaults={"max_iter": 1})
    )
    with pytest.raises(SolverError, match="iteration limit"):
        qp(Q, q, G, h, settings="defaults")
