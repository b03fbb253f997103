"""Build the tutorial notebooks/05_choosing_a_backend.ipynb (cells only, no outputs).

python notebooks/src/05_choosing_a_backend.py
OMP_NUM_THREADS=1 python tasks/notebooks.py --save 05_choosing_a_backend.ipynb
"""

from _build import write

CELLS = [
    (
        "md",
        r"""# 05 · Choosing a solver backend

Every optimization layer of the library solves a convex problem in the forward pass and
differentiates its solution in the backward pass. *How* it does so is the **backend**:

* the projects' own solvers: `torch-ipm` (a batched primal-dual interior point written in torch,
  with an implicit KKT backward) and `native` TV (an interior point on TV's dual box QP with an
  exact active-set backward);
* **cvxpylayers** with **diffcp** (SCS, Clarabel or ECOS: one conic solve per batch element,
  derivative of the cone program's residual map) or with **moreau** (batched QP solver in C++);
* **qpth**, OptNet's batched dense QP solver (a peer).

They differ in speed *and in the accuracy of the gradients*: a solver that stops at a loose
tolerance gives a gradient that is off by as much. This notebook reads the figures that
`tasks/compare_backends.py` measured, runs a small comparison live, and shows how to pick a
backend.""",
    ),
    (
        "code",
        """%matplotlib inline
import contextlib
import io
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from layers import BACKENDS
from tasks.backends import compare as cb
from tasks.compare_backends import main as compare_backends

for name, b in BACKENDS.items():
    print(f"{name:<16} {b.about}")""",
    ),
    (
        "md",
        r"""## What the full comparison recommends

`python tasks/compare_backends.py --threads 1` runs every layer on every backend, with the
library's tuned settings and with each solver's defaults, and measures time and the error of
the solution and of the gradient against an independent reference (Clarabel finds the active
set, then the KKT system is solved exactly). Its recommendation per layer is the fastest backend
whose errors stay below $10^{-5}$ on all of the layer's problems; the layers' defaults follow it
(a test checks that).""",
    ),
    (
        "code",
        """saved = Path("results/backends/results-cpu.json")
full = json.loads(saved.read_text()) if saved.exists() else None
if full:
    m = full["machine"]
    print(f"measured {full['date']}: {m['cpu_count']} cores, {m['torch_threads']} torch thread")
    for layer, r in full["recommended"].items():
        print(f"{layer:<8} -> {r['backend']}   (library default: {cb.current_defaults()[layer]})")
else:
    print("no saved comparison: run python tasks/compare_backends.py")""",
    ),
    (
        "code",
        """def scatter(rows, problems, title):
    fig, axes = plt.subplots(1, len(problems), figsize=(3.6 * len(problems), 3.2), squeeze=False)
    for ax, prob in zip(axes[0], problems):
        for r in rows:
            if r["problem"] != prob or r.get("grad_err") is None:
                continue
            point = (r["fwd_bwd_ms"], max(r["grad_err"], 1e-16))
            ax.scatter(*point, marker="o" if r["tuned"] else "x", s=25)
            ax.annotate(r["method"].replace(" (defaults)", "*"), point, fontsize=6)
        ax.axhline(cb.TARGET, color="k", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", title=prob, xlabel="fwd+bwd (ms)")
    axes[0][0].set_ylabel("gradient rel. error")
    fig.suptitle(title + "   (* = solver defaults; dotted: 1e-5)", fontsize=9)
    fig.tight_layout()
    plt.show()


if full:
    for layer, title in [("qp", "OptNet QP"), ("tv", "TV denoising"), ("lp-sort", "LP sorts")]:
        probs = [p["name"] for p in full["problems"] if p["layer"] == layer]
        scatter(full["rows"], probs, title)""",
    ),
    (
        "md",
        r"""Read each panel from the bottom left (fast and accurate) to the top right. Two patterns
recur: the solvers' **default settings** (crosses) give gradients with errors of $10^{-6}$ to
$10^{-1}$, and a solver specialised to the problem (`native` for TV, a batched QP solver for
the QPs) is one to two orders of magnitude faster than a generic conic solver called once per
batch element.

## A small comparison, live

The `--quick` mode runs small versions of every problem (CI runs it). Here: the top-k LP that
the differentiable kNN uses, on the native solver and four cvxpylayers backends.""",
    ),
    (
        "code",
        """out = Path(tempfile.mkdtemp())
with contextlib.redirect_stdout(io.StringIO()):  # the script's own log
    methods = ["native", "moreau", "torch-ipm", "diffcp-clarabel", "diffcp-clarabel (defaults)"]
    methods.append("neuralsort (closed form)")
    res = compare_backends(
        ["--quick", "--problems", "lp-topk", "--methods", *methods, "--out", str(out)]
    )
for r in res["rows"]:
    if r["status"] != "ok":  # a solve that fails its check is reported, never used
        print(f"{r['method']:<28} {r['status']}: {str(r.get('error', ''))[:60]}")
        continue
    err = "-" if r.get("grad_err") is None else f"{r['grad_err']:.1e}"
    print(f"{r['method']:<28} {r['fwd_bwd_ms']:8.1f} ms   gradient error {err}")""",
    ),
    (
        "md",
        r"""NeuralSort has no error column: it is a different relaxation (closed form), shown as the
speed a sort relaxation can reach without a solver.

## Picking a backend in code

Every layer takes `backend=` (and `settings="defaults"` for the solver's own settings, which the
comparison shows you rarely want). The solution is checked before it is used: an inaccurate
solve raises `SolverError` instead of returning a wrong gradient.""",
    ),
    (
        "code",
        """from layers import LPTopK, difference_matrix, qp, tv_denoise

torch.manual_seed(0)
Q = torch.eye(4, dtype=torch.float64) * 2
q = torch.randn(4, dtype=torch.float64, requires_grad=True)
G, h = torch.eye(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64) * 0.2
for backend in ["torch-ipm", "moreau", "qpth"]:
    x = qp(Q, q, G, h, backend=backend)
    (g,) = torch.autograd.grad(x.sum(), q)
    print(f"{backend:<10} x = {x.detach().numpy().round(4)}  d(sum x)/dq = {g.numpy().round(4)}")

y = torch.randn(3, 50, dtype=torch.float64).cumsum(-1)
x_native = tv_denoise(y, difference_matrix(50, dtype=torch.float64), 1.0)  # default: native
x_moreau = tv_denoise(y, difference_matrix(50, dtype=torch.float64), 1.0, backend="moreau")
print("TV native vs moreau: max |difference| =", float((x_native - x_moreau).abs().max().detach()))
print(LPTopK(regularization_strength=0.5, backend="moreau"))""",
    ),
]

if __name__ == "__main__":
    write(CELLS, "05_choosing_a_backend.ipynb")
