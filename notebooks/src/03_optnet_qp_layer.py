"""Build the tutorial notebooks/03_optnet_qp_layer.ipynb (cells only, no outputs).

    python notebooks/src/03_optnet_qp_layer.py
    OMP_NUM_THREADS=1 python tasks/notebooks.py --save 03_optnet_qp_layer.ipynb

The first command writes the notebook from the cells below; the second executes it and stores
the outputs.
"""

from __future__ import annotations

from _build import write

CELLS = [
    (
        "md",
        r"""
# 03 · The OptNet QP layer

OptNet (Amos & Kolter, 2017) makes the solution of a quadratic program a layer of a network:

$$x^\star(Q, q, G, h, A, b) = \arg\min_x \ \tfrac12 x^\top Q x + q^\top x
\quad \text{s.t.} \quad Gx \le h, \quad Ax = b,$$

with $Q \succeq 0$. The forward pass solves the QP; the backward pass differentiates the KKT
conditions at the solution (implicit function theorem), so gradients reach all six inputs without
unrolling the solver. This notebook uses `layers.qp`:

| name | what it is |
|---|---|
| `qp(Q, q, G, h, A, b)` | the functional layer, batched, any backend |
| `solve_qp` | the library's batched interior-point solver (no gradients, returns an info record) |
| `kkt_residuals` | relative primal, dual and complementarity residuals of a solution |
| `OptNetQP` | an `nn.Module` whose parameters produce an always-feasible QP |
""",
    ),
    (
        "code",
        """
import time
import warnings

import cvxpy as cp
import matplotlib.pyplot as plt
import torch

from layers import BACKENDS, DEFAULT_BACKEND, OptNetQP, SolverError, kkt_residuals, qp, solve_qp

_ = torch.manual_seed(0)
""",
    ),
    (
        "md",
        r"""
## The problem, stated in CVXPY

In CVXPY the QP is a few lines, with the data as parameters:
""",
    ),
    (
        "code",
        """
n, m, p = 3, 4, 1
x = cp.Variable(n)
Q = cp.Parameter((n, n), PSD=True)
q, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
A, b = cp.Parameter((p, n)), cp.Parameter(p)
problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) + q @ x), [G @ x <= h, A @ x == b])
print(problem)
""",
    ),
    (
        "md",
        r"""
`qp` and `OptNetQP` wrap exactly this statement: they take $Q, q, G, h, A, b$ as tensors (with an
optional leading batch dimension) and return $x^\star$ with gradients. The cvxpylayers backends
canonicalize this problem once per size (for diffcp with $\tfrac12\|Fx\|^2$, $F^\top F = Q$, since
a parametric `quad_form` is not DPP for conic solvers); the default backend `torch-ipm` skips
CVXPY and solves the batch with a dense primal-dual interior-point method written in torch.

Let us generate data that is feasible by construction: pick $z_0$, then $h = G z_0 + s$ with
$s > 0$ and $b = A z_0$, and $Q = LL^\top/n + 0.1 I$. Solving one instance both ways gives the
same $x$:
""",
    ),
    (
        "code",
        """
def random_qp(B, n, m, p, dtype=torch.float64):
    \"\"\"A batch of B strictly feasible QPs with n variables, m inequalities, p equalities.\"\"\"
    L = torch.randn(B, n, n, dtype=dtype)
    Q = L @ L.mT / n + 0.1 * torch.eye(n, dtype=dtype)
    q = torch.randn(B, n, dtype=dtype)
    G, A = torch.randn(B, m, n, dtype=dtype), torch.randn(B, p, n, dtype=dtype)
    z0 = torch.randn(B, n, 1, dtype=dtype)
    h = (G @ z0).squeeze(-1) + torch.rand(B, m, dtype=dtype)
    b = (A @ z0).squeeze(-1)
    return Q, q, G, h, A, b


one = random_qp(1, n, m, p)
for par, value in zip([Q, q, G, h, A, b], one):
    par.value = value[0].numpy()
problem.solve()
print("CVXPY    :", x.value)
print("layers.qp:", qp(*one)[0].numpy())
""",
    ),
    (
        "md",
        r"""
## Solving a batch

A batch of 4 problems with $n = 10$ variables, $m = 15$ inequalities and $p = 3$ equalities. With
`duals=True` the layer also returns the multipliers $\lambda \ge 0$ (inequalities) and $\nu$
(equalities), in the convention $Qx + q + G^\top\lambda + A^\top\nu = 0$. `kkt_residuals`
measures how well each element satisfies the KKT conditions; the layer itself raises if any
element's residual exceeds the backend's tolerance. `solve_qp`, the solver under the default
backend, also reports what it did.
""",
    ),
    (
        "code",
        """
data = random_qp(4, 10, 15, 3)
x, lam, nu = qp(*data, duals=True)
print("x[0]  =", x[0].numpy().round(3))
print("shapes: x", tuple(x.shape), " lam", tuple(lam.shape), " nu", tuple(nu.shape))
print("active inequalities per element:", (lam > 1e-8).sum(-1).tolist())

primal, dual, comp = kkt_residuals(*data, x, lam, nu)
print("\\nelement   primal    dual      compl.")
for i in range(len(x)):
    print(f"{i:>7}   {primal[i]:.1e}   {dual[i]:.1e}   {comp[i]:.1e}")

info = solve_qp(*data).info
print(f"\\nsolve_qp: {info.iterations} iterations, status {info.status_names}")
""",
    ),
    (
        "md",
        r"""
## Gradients against finite differences

The backward pass solves one linear system with the KKT matrix at the solution (OptNet eqs. 6-8).
`torch.autograd.gradcheck` compares it with central finite differences, in float64, for all six
inputs of a tiny problem:
""",
    ),
    (
        "code",
        """
tiny = [t[0].clone().requires_grad_() for t in random_qp(1, 3, 4, 1)]
print("gradcheck:", torch.autograd.gradcheck(qp, tiny))
""",
    ),
    (
        "md",
        r"""
## Backends

`layers.backends.BACKENDS` lists every solver the layer can use; `qp(..., backend=name)` switches
between them. Each is called once to warm up (the cvxpylayers backends canonicalize the CVXPY
problem on the first call), then timed over 3 forward+backward passes on the batch above. We
compare $x$ and the gradient of $\sum_i w_i^\top x_i$ (relative to its size) with the default
backend. A backend whose package is missing raises `ImportError`, and is skipped.
""",
    ),
    (
        "code",
        """
w = torch.randn(4, 10, dtype=torch.float64)


def forward_backward(backend):
    inputs = [t.clone().requires_grad_() for t in data]
    x = qp(*inputs, backend=backend)
    (w * x).sum().backward()
    return x.detach(), [t.grad for t in inputs]


x_ref, g_ref = forward_backward(DEFAULT_BACKEND)
print(f"{'backend':<16} {'max|x - x_def|':>14} {'grad rel. err':>13} {'ms/fwd+bwd':>10}")
for name in BACKENDS:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            forward_backward(name)  # warm-up
        except ImportError as err:
            print(f"{name:<16} skipped: {err}")
            continue
        t0 = time.perf_counter()
        for _ in range(3):
            xb, gb = forward_backward(name)
        ms = 1000 * (time.perf_counter() - t0) / 3
    dx = (xb - x_ref).abs().max().item()
    dg = max(((a - r).abs().max() / r.abs().max()).item() for a, r in zip(gb, g_ref))
    notes = "; ".join(sorted({str(c.message)[:50] for c in caught}))
    print(
        f"{name:<16} {dx:>14.1e} {dg:>13.1e} {ms:>10.0f}" + (f"  warned: {notes}" if notes else "")
    )
""",
    ),
    (
        "md",
        r"""
`moreau` and `qpth` agree with `torch-ipm` to $10^{-9}$ or better in $x$. The diffcp backends
state the quadratic objective through a second-order cone, which limits Clarabel and ECOS to
about $10^{-6}$; SCS gets far closer here only because the library gives it very tight
tolerances. On problems this small every backend takes milliseconds; the differences show at
large batches and sizes (`tasks/bench_qp.py`).

## An infeasible element

Now element 1 of a batch of 3 gets the contradictory constraints $x_0 \le -1$ and $-x_0 \le -1$
(the other elements get the harmless $|x_0| \le 5$). The layer raises `SolverError`, whose message
and `failed` attribute name the batch element; other backends' errors are explained with what
`torch-ipm` finds. `solve_qp` itself never raises: it flags the element in its status.
""",
    ),
    (
        "code",
        """
Qb, qb, Gb, hb, Ab, bb = random_qp(3, 10, 15, 3)
e0 = torch.eye(10, dtype=torch.float64)[0]
Gb = torch.cat([Gb, torch.stack([e0, -e0]).expand(3, 2, 10)], 1)
hb = torch.cat([hb, torch.tensor([[5.0, 5.0], [-1.0, -1.0], [5.0, 5.0]], dtype=torch.float64)], 1)

for backend in ["torch-ipm", "diffcp-clarabel"]:
    try:
        qp(Qb, qb, Gb, hb, Ab, bb, backend=backend)
    except SolverError as err:
        print(f"SolverError: {err}\\n  failed = {err.failed}\\n")
print("solve_qp status:", solve_qp(Qb, qb, Gb, hb, Ab, bb).info.status_names)
""",
    ),
    (
        "md",
        r"""
## Learning a QP

`OptNetQP(n, m, p)` holds the QP data as parameters, in the paper's always-feasible form:
$Q = LL^\top + \epsilon I$, $h = G z_0 + s_0$ with $s_0 > 0$ (and $b = A z_0$), so no parameter
value can make the problem infeasible. By default `forward` takes $q$ as its input.

As a target we take the projection onto the box $[-1, 1]^n$, $y \mapsto \operatorname{clip}(y,
-1, 1)$, which is itself the QP $\min \tfrac12\|x - y\|^2$ s.t. $-1 \le x \le 1$, i.e. $Q = I$,
$q = -y$, $G = [I; -I]$, $h = \mathbf 1$. The layer ($n = 4$, random $G$ with $m = 16$ rows)
sees only input/output pairs $(-y, \operatorname{clip}(y))$ and is trained with Adam on the
squared error. It gets twice as many half-spaces as the 8 faces it needs: with $m = 8$, one
coordinate often gets stuck in a local minimum without its faces (try it).
""",
    ),
    (
        "code",
        """
torch.manual_seed(0)
n = 4
layer = OptNetQP(n, 4 * n)
print(layer)
opt = torch.optim.Adam(layer.parameters(), lr=0.05)
losses, t0 = [], time.perf_counter()
for _step in range(150):
    y = 2 * torch.randn(64, n)
    loss = (layer(-y) - y.clamp(-1, 1)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(f"150 steps in {time.perf_counter() - t0:.1f}s; loss {losses[0]:.3f} -> {losses[-1]:.1e}")

t = torch.linspace(-3, 3, 121)
y_line = torch.stack([t, 0.5 * torch.ones_like(t), -0.5 * torch.ones_like(t), t / 3], 1)
with torch.no_grad():
    x_line = layer(-y_line)
fig, axes = plt.subplots(1, 2, figsize=(7, 3))
axes[0].semilogy(losses)
axes[0].set_xlabel("Adam step")
axes[0].set_ylabel("squared error")
axes[1].plot(t, x_line[:, 0], lw=4, alpha=0.4, label="learned QP")
axes[1].plot(t, t.clamp(-1, 1), "k--", label="clip(y)")
axes[1].set_xlabel("$y_0$")
axes[1].set_ylabel("$x_0$")
axes[1].legend()
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()
""",
    ),
    (
        "md",
        r"""
What did it learn? `qp_data` returns the QP the layer currently solves. We print $Q$ and each
half-space $g^\top x \le h$ scaled to $\|g\| = 1$. A half-space is redundant inside the box when
$\max_{x \in [-1, 1]^n} g^\top x = \|g\|_1 < h$.
""",
    ),
    (
        "code",
        """
with torch.no_grad():
    learned = layer.qp_data(torch.zeros(n))
    scale = learned["G"].norm(dim=1)
    G_unit, h_unit = learned["G"] / scale[:, None], learned["h"] / scale
print("learned Q:\\n", learned["Q"].numpy().round(2) + 0.0)
print("\\nhalf-spaces g'x <= h (|g| = 1):")
for g, off in zip(G_unit, h_unit):
    kind = "redundant in the box" if g.abs().sum() < off else ""
    print(f"  g = {g.numpy().round(2) + 0.0}   h = {off:.2f}   {kind}")
""",
    ),
    (
        "md",
        r"""
$Q$ is the identity to two decimals, 8 of the 16 random half-spaces have become exactly the box
faces $\pm x_i \le 1$, and the other 8 have moved out of the way: the layer recovered the QP behind
the target map from input/output pairs alone.

## Learning through infeasible constraints

The always-feasible parameterization is a choice. When the constraints are learned freely, a
training step can make them contradictory, and then there is no solution to return: by default
(`infeasible="raise"`) the layer raises `SolverError`. With `infeasible="closest"` such an
element is solved as its *closest feasible problem* instead, the elastic QP

$$\min_x \ \tfrac12 x^\top Q x + q^\top x + \tfrac{\rho}{2}\,\|(\hat G x - \hat h)_+\|^2
+ \tfrac{\rho}{2}\,\|\hat A x - \hat b\|^2$$

(rows of $G$ and $A$ scaled to unit norm, so a violation is a distance; $\rho$ =
`closest_weight`, $10^6$ by default), which tends to the minimizer of the objective over the
points of least violation as $\rho$ grows. Feasible elements of the batch are solved exactly as
before, every element gets its gradient, and `info=True` returns which elements were relaxed.

Here the layer learns the box of the previous section from scratch, with $G = [I; -I]$ fixed
and the offsets $h$ learned, starting from $h = -\tfrac12$: $x \le -\tfrac12$ and
$x \ge \tfrac12$, infeasible. The closest feasible point of two contradictory bounds is their
midpoint, whatever the input, so the data loss alone cannot tell the bounds to open; the loss
adds the squared violation of the returned $x$, which does.
""",
    ),
    (
        "code",
        """
torch.manual_seed(0)
n = 4
G_box = torch.cat([torch.eye(n), -torch.eye(n)])
h_learned = torch.nn.Parameter(torch.full((2 * n,), -0.5))  # x <= -1/2 and x >= 1/2
y = 2 * torch.randn(64, n)
try:
    qp(torch.eye(n), -y, G_box, h_learned)
except SolverError as err:
    print("infeasible='raise':", str(err)[:90], "...")

opt = torch.optim.Adam([h_learned], lr=0.05)
losses, relaxed, offsets = [], [], []
for _step in range(150):
    y = 2 * torch.randn(64, n)
    x, info = qp(torch.eye(n), -y, G_box, h_learned, infeasible="closest", info=True)
    violation = (x @ G_box.T - h_learned).clamp_min(0).pow(2).sum(-1).mean()
    loss = (x - y.clamp(-1, 1)).pow(2).mean() + violation
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    relaxed.append(info.relaxed.float().mean().item())
    offsets.append(h_learned.detach().clone())
print("learned h:", h_learned.detach().numpy().round(3))
first_feasible = next(i for i, r in enumerate(relaxed) if r == 0)
print(f"relaxed until step {first_feasible}; final loss {losses[-1]:.1e}")

fig, axes = plt.subplots(1, 2, figsize=(7, 3))
axes[0].semilogy(losses, label="loss")
axes[0].plot(relaxed, label="fraction relaxed")
axes[0].set_xlabel("Adam step")
axes[0].legend()
offsets = torch.stack(offsets)
axes[1].plot(offsets[:, :n], "tab:blue", lw=1)
axes[1].plot(-offsets[:, n:], "tab:orange", lw=1)
axes[1].axhline(0, color="k", lw=0.5)
axes[1].set_xlabel("Adam step")
axes[1].set_ylabel("upper bounds (blue), lower (orange)")
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()
""",
    ),
    (
        "md",
        r"""
While the bounds cross, every element is relaxed and the violation term pushes both bounds
apart; once they no longer cross, the QP is feasible again and the data loss drives them to
$\pm 1$. With `infeasible="raise"` the first step would have stopped training. The next
notebook uses the same machinery for total-variation denoising, where the QP has a special
structure (a box-constrained dual) that a dedicated solver exploits.
""",
    ),
]


if __name__ == "__main__":
    write(CELLS, "03_optnet_qp_layer.ipynb")
