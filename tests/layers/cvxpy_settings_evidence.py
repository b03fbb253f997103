"""Evidence for diffcp-clarabel's settings: gradient error over varied problems.

Run: ``python tests/layers/cvxpy_settings_evidence.py`` (a helper, not collected by pytest).
For each problem and each setting (diffcp ``mode`` x Clarabel tolerances), the gradient of
``w . x*(p)`` for a fixed random ``w`` is compared with central finite differences of a
tightly solved problem (``cvxpy`` + Clarabel at 1e-12, step 1e-5); the table prints the largest
absolute error, scaled by max(1, |fd gradient|). The last columns are CvxpyProblemLayer with
the library's settings (Clarabel's retries included) on diffcp-clarabel and diffcp-scs.
"""

from __future__ import annotations

import sys
from typing import Any

import cvxpy as cp
import numpy as np
import torch
from cvxpylayers.torch import CvxpyLayer

from layers import CvxpyProblemLayer

TIGHT = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "tol_ktratio": 1e-10}
MID = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8}
SETTINGS: dict[str, Any] = {
    "dense/tight": {"mode": "dense", **TIGHT},
    "dense/1e-10": {"mode": "dense", **MID},
    "dense/default": {"mode": "dense"},
    "lsqr/tight": {"mode": "lsqr", **TIGHT},
    "lsqr/1e-10": {"mode": "lsqr", **MID},
    "lsqr/default": {"mode": "lsqr"},
    "library diffcp-clarabel": "diffcp-clarabel",  # CvxpyProblemLayer: table settings, retries
    "library diffcp-scs": "diffcp-scs",
}


def problems(rng: np.random.Generator):
    """(name, problem, parameters, variable, values)."""
    out = []
    n = 10
    b, x = cp.Parameter(n), cp.Variable(n)
    out.append(
        (
            "equality n10",
            cp.Problem(cp.Minimize(cp.sum_squares(x)), [x == b]),
            [b],
            x,
            [rng.standard_normal(n)],
        )
    )
    A, b, x = cp.Parameter((30, 8)), cp.Parameter(30), cp.Variable(8)
    obj = cp.sum_squares(A @ x - b) + cp.sum_squares(x)
    out.append(
        (
            "least squares 30x8",
            cp.Problem(cp.Minimize(obj)),
            [A, b],
            x,
            [rng.standard_normal((30, 8)), rng.standard_normal(30)],
        )
    )
    y, x = cp.Parameter(6), cp.Variable(6)
    out.append(
        (
            "simplex projection",
            cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0, cp.sum(x) == 1]),
            [y],
            x,
            [rng.standard_normal(6)],
        )
    )
    Q = rng.standard_normal((6, 6))
    q, G, h, x = cp.Parameter(6), cp.Parameter((4, 6)), cp.Parameter(4), cp.Variable(6)
    obj = 0.5 * cp.sum_squares(Q @ x) + q @ x
    out.append(
        (
            "QP 4 ineq",
            cp.Problem(cp.Minimize(obj), [G @ x <= h, x <= 1, x >= -1]),
            [q, G, h],
            x,
            [rng.standard_normal(6), rng.standard_normal((4, 6)), rng.random(4) + 0.1],
        )
    )
    c, x = cp.Parameter(5), cp.Variable(5)
    Aeq = rng.standard_normal((2, 5))
    out.append(
        (
            "box LP + eq",
            cp.Problem(
                cp.Minimize(c @ x + 0.1 * cp.sum_squares(x)), [x >= -1, x <= 1, Aeq @ x == 0]
            ),
            [c],
            x,
            [rng.standard_normal(5)],
        )
    )
    xp, y = cp.Parameter(4), cp.Variable(4)
    obj = -xp @ y - cp.sum(cp.entr(y)) - cp.sum(cp.entr(1.0 - y))
    out.append(
        (
            "LML (exp)",
            cp.Problem(cp.Minimize(obj), [cp.sum(y) == 2]),
            [xp],
            y,
            [np.array([1.0, -1.0, -1.0, -0.5])],
        )
    )
    X, lam, a = cp.Parameter((5, 2)), cp.Parameter(1, nonneg=True), cp.Variable(2)
    yv = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    ll = cp.sum(cp.multiply(yv, X @ a) - cp.logistic(X @ a))
    out.append(
        (
            "logistic (exp)",
            cp.Problem(cp.Minimize(-ll + lam * cp.sum_squares(a))),
            [X, lam],
            a,
            [rng.standard_normal((5, 2)), np.array([0.1])],
        )
    )
    C, Xv = cp.Parameter((3, 3), symmetric=True), cp.Variable((3, 3), symmetric=True)
    Cv = np.array([[2.0, 0.5, 0.1], [0.5, 3.0, 0.2], [0.1, 0.2, 1.5]])
    out.append(
        (
            "SDP 3x3",
            cp.Problem(cp.Minimize(cp.trace(C @ Xv)), [Xv >> 0, cp.trace(Xv) == 1]),
            [C],
            Xv,
            [Cv],
        )
    )
    y, x = cp.Parameter(5), cp.Variable(5)
    out.append(
        (
            "SOC ball projection",
            cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [cp.norm(x, 2) <= 1]),
            [y],
            x,
            [2 * rng.standard_normal(5)],
        )
    )
    A, b, x = cp.Parameter((4, 3)), cp.Parameter(4), cp.Variable(3)
    out.append(
        (
            "l1 regression",
            cp.Problem(cp.Minimize(cp.norm(A @ x - b, 1) + 0.5 * cp.sum_squares(x))),
            [A, b],
            x,
            [rng.standard_normal((4, 3)), rng.standard_normal(4)],
        )
    )
    return out


def reference_grad(prob, params, var, values, w, h=1e-5):
    def f(vals):
        for p, v in zip(params, vals):
            p.value = v
        prob.solve(cp.CLARABEL, **TIGHT, max_iter=500, max_step_fraction=0.9)
        return float(np.sum(w * var.value))

    grads = []
    for i, v in enumerate(values):
        g = np.zeros_like(v)
        for idx in np.ndindex(v.shape):
            up = [u.copy() for u in values]
            dn = [u.copy() for u in values]
            up[i][idx] += h
            dn[i][idx] -= h
            if params[i].attributes.get("symmetric"):
                j = idx[::-1]
                if j != idx:
                    up[i][j] += h
                    dn[i][j] -= h
            g[idx] = (f(up) - f(dn)) / (2 * h)
        grads.append(g)
    return grads


def main() -> None:
    rng = np.random.default_rng(243)
    names = list(SETTINGS)
    print("| problem | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for name, prob, params, var, values in problems(rng):
        w = rng.standard_normal(var.shape)
        ref = reference_grad(prob, params, var, values, w)
        row = []
        layer = CvxpyLayer(prob, parameters=params, variables=[var])
        for s in names:
            ts = [torch.tensor(v, requires_grad=True) for v in values]
            try:
                if isinstance(SETTINGS[s], str):
                    lib = CvxpyProblemLayer(prob, params, [var], backend=SETTINGS[s])
                    (xs,) = lib(*ts)
                else:
                    (xs,) = layer(*ts, solver_args={"solve_method": "Clarabel", **SETTINGS[s]})
                gs = torch.autograd.grad((xs * torch.tensor(w)).sum(), ts)
                err = 0.0
                for g, r in zip(gs, ref):
                    g = g.numpy()
                    if params[0].attributes.get("symmetric") and g.ndim == 2:
                        g = g + g.T - np.diag(np.diag(g))
                    err = max(err, float(np.max(np.abs(g - r)) / max(1.0, np.max(np.abs(r)))))
                row.append(f"{err:.1e}")
            except Exception as e:
                row.append(f"fail: {type(e).__name__}")
        print(f"| {name} | " + " | ".join(row) + " |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
