"""Compare the solver backends of every optimization layer: problems, measurements, the report."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from layers import (
    BACKENDS,
    TV_BACKENDS,
    difference_matrix,
    grid_difference_matrix,
    neural_sort,
    qp,
    sort_native,
    tv_denoise,
    tv_denoise_2d,
)
from layers.sort_lp import DEFAULT_LP_BACKEND, sort_qp_layer
from tasks.backends.qp_bench import (
    QUICK_SIZES,
    SIZES,
    available,
    measure,
    random_qp,
    reference,
    rel_error,
)
from tasks.backends.tv_qp import tv_qp
from tasks.common.bench import machine_info
from tasks.common.cli import (
    UserError,
    atomic_write_text,
    set_up_torch,
    write_csv,
    write_json,
)

CompareConfig = Any  # the flags dataclass of tasks/compare_backends.py

TARGET = 1e-5  # largest solution / gradient error a recommended backend may have
LAYERS = ("qp", "tv", "lp-sort")
F64 = torch.float64

Tensor = torch.Tensor
QPData = dict[str, "Tensor | None"]


def _settings(library: bool) -> str:
    """The ``settings=`` of a layer call: the library's accurate settings or the solver's own."""
    return "accurate" if library else "defaults"


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One benchmark problem: inputs, their map to QP data, and the methods that solve it.

    ``methods[name](*inputs) -> (B, n_out)``: the solution, flattened per batch element; it is
    the first ``n_out`` variables of the QP that ``to_qp(*inputs)`` builds.
    """

    name: str
    layer: str
    about: str
    inputs: dict[str, Tensor]
    to_qp: Callable[..., QPData]
    n_out: int
    methods: dict[str, Callable[..., Tensor]]
    skipped: dict[str, str] = field(default_factory=dict)
    closed_form: set[str] = field(default_factory=set)  # timing references, no error columns
    # the output as a function of the QP solution and the inputs, when it is not the first
    # n_out QP variables (TV through its dual: x = y - D'z)
    from_qp: Callable[..., Tensor] | None = None


def _differ(backend: str) -> bool:
    if backend not in BACKENDS:
        return False
    b = BACKENDS[backend]
    return b.kind == "cvxpylayers" or b.accurate != b.solver_defaults


def _installed(backend: str) -> str | None:
    """Why ``backend`` (a QP backend, or a TV-only one such as ``native``) cannot run here."""
    return available(backend) if backend in BACKENDS else None


def _collect(
    backends: list[str] | tuple[str, ...],
    method: Callable[[str, bool], Callable[..., Tensor]],
    why_not: Callable[[str], str | None],
) -> tuple[dict[str, Callable[..., Tensor]], dict[str, str]]:
    """Each backend with the library's settings, and with the solver's defaults where they
    differ: ``(methods, skipped)``, ``skipped`` saying why a method cannot run here."""
    methods: dict[str, Callable[..., Tensor]] = {}
    skipped: dict[str, str] = {}
    for b in backends:
        reason = why_not(b)
        variants = [(b, True)] + ([(f"{b} (defaults)", False)] if _differ(b) else [])
        for name, tuned in variants:
            if reason:
                skipped[name] = reason
                continue
            try:
                methods[name] = method(b, tuned)
            except Exception as err:  # a backend that cannot take the problem
                skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return methods, skipped


def _qp_problem(size: str, quick: bool, seed: int, max_diffcp_n: int) -> Problem:
    B, n, m, p, dens = (QUICK_SIZES if quick else SIZES)[size]
    data = {k: v for k, v in random_qp(B, n, m, p, density=dens, seed=seed).items()}
    names = [k for k, v in data.items() if v is not None]

    def to_qp(*args: Tensor) -> QPData:
        d: QPData = dict.fromkeys(("Q", "q", "G", "h", "A", "b"))
        d.update(zip(names, args))
        return d

    def method(backend: str, tuned: bool) -> Callable[..., Tensor]:
        def run(*args: Tensor) -> Tensor:
            d = to_qp(*args)
            return qp(
                d["Q"],
                d["q"],
                d["G"],
                d["h"],
                d["A"],
                d["b"],
                backend=backend,
                settings=_settings(tuned),
                check=tuned,
            )  # type: ignore[return-value]

        return run

    def why_not(b: str) -> str | None:
        if BACKENDS[b].kind == "cvxpylayers" and n > max_diffcp_n:  # moreau too
            return (
                f"n={n} > --max_diffcp_n {max_diffcp_n}: CVXPY canonicalizes the n x n Q "
                f"parameter into ~3 n^3 entries (~{3 * n**3 * 8 / 2**30:.0f} GiB)"
            )
        return available(b, n, max_diffcp_n)

    methods, skipped = _collect(list(BACKENDS), method, why_not)
    dens_txt = "dense" if dens >= 1 else f"{100 * dens:g}% nonzeros"
    return Problem(
        f"qp-{size}",
        "qp",
        f"OptNet QP, batch {B}, n {n}, {m} inequalities, {p} equalities, {dens_txt}",
        {k: data[k] for k in names},  # type: ignore[misc]
        to_qp,
        n,
        methods,
        skipped,
    )


def _tv_dual_qp(y: Tensor, D: Tensor, lam: Tensor) -> QPData:
    """1-D TV's dual, a strictly convex box QP (first differences have full row rank):
    ``min_z 1/2 |y - D'z|^2`` s.t. ``|z| <= lam``, and ``x = y - D'z`` (:func:`_tv_from_dual`)."""
    B = y.shape[0]
    m = D.shape[-2]
    eye = torch.eye(m, dtype=F64)
    return {
        "Q": (D @ D.mT).expand(B, -1, -1),
        "q": -(y @ D.mT),
        "G": torch.cat([eye, -eye]).expand(B, -1, -1),
        "h": lam.reshape(1, 1).expand(B, 2 * m),
        "A": None,
        "b": None,
    }


def _tv_from_dual(z: Tensor, y: Tensor, D: Tensor, lam: Tensor) -> Tensor:
    return y - z @ D


def _tv_signals(B: int, n: int, seed: int) -> Tensor:
    """Piecewise-constant signals plus noise (the denoising task's kind of data)."""
    g = torch.Generator().manual_seed(seed)
    jumps = (torch.rand(B, n, generator=g) < 8 / n).to(F64) * torch.randn(B, n, generator=g)
    return jumps.cumsum(-1) + 0.3 * torch.randn(B, n, generator=g, dtype=F64)


def _tv_problem(n: int, B: int, seed: int) -> Problem:
    y = _tv_signals(B, n, seed)
    D = difference_matrix(n, dtype=F64)
    lam = torch.tensor(0.5, dtype=F64)

    def method(backend: str, tuned: bool) -> Callable[..., Tensor]:
        extra = {} if tuned else {"check_tol": math.inf}
        return lambda y, D, lam: tv_denoise(
            y, D, lam, backend=backend, settings=_settings(tuned), **extra
        )

    methods, skipped = _collect(TV_BACKENDS, method, _installed)
    return Problem(
        f"tv-{n}",
        "tv",
        f"1-D TV denoising, batch {B}, n {n}, first differences; gradients for y, D, lam",
        {"y": y, "D": D, "lam": lam},
        _tv_dual_qp,
        n,
        methods,
        skipped,
        from_qp=_tv_from_dual,
    )


def _tv2d_problem(side: int, B: int, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(B, side, side, dtype=F64)
    for i in range(B):  # a bright rectangle per image, plus noise
        r0, c0 = torch.randint(0, side // 2, (2,), generator=g).tolist()
        img[i, r0 : r0 + side // 2, c0 : c0 + side // 3] = 1.0
    y = (img + 0.3 * torch.randn(B, side, side, generator=g, dtype=F64)).reshape(B, -1)
    D = grid_difference_matrix(side, side, dtype=F64)
    lam = torch.tensor(0.3, dtype=F64)

    def method(backend: str, tuned: bool) -> Callable[..., Tensor]:
        extra = {} if tuned else {"check_tol": math.inf}

        def run(y: Tensor, lam: Tensor) -> Tensor:
            x = tv_denoise_2d(
                y.reshape(-1, side, side), lam, backend=backend, settings=_settings(tuned), **extra
            )
            return x.reshape(y.shape)  # type: ignore[union-attr]

        return run

    no_qpth = [b for b in TV_BACKENDS if b != "qpth"]  # tv_denoise_2d has no qpth path
    methods, skipped = _collect(no_qpth, method, _installed)
    return Problem(
        f"tv2d-{side}x{side}",
        "tv",
        f"2-D anisotropic TV denoising, batch {B}, {side} x {side} images; gradients for y, lam",
        {"y": y, "lam": lam},
        lambda y, lam: tv_qp(y, D, lam),
        side * side,
        methods,
        skipped,
    )


def _sort_qp(kind: str, n: int, k: int) -> Callable[[Tensor], QPData]:
    """The QP data of ``layers.sort.sort_qp_problem(kind, n, k)`` (variable flattened
    row-major), as a function of its parameter."""
    eye = torch.eye(n, dtype=F64)
    if kind == "topk":
        G, h = torch.cat([-eye, eye]), torch.cat([torch.zeros(n), torch.ones(n)]).to(F64)
        A, b = torch.ones(1, n, dtype=F64), torch.tensor([float(k)], dtype=F64)
        Q = eye
    elif kind == "isotonic":  # v_{i+1} - v_i <= 0
        G = (torch.diag(torch.ones(n - 1), 1) - torch.eye(n))[: n - 1].to(F64)
        h, A, b, Q = torch.zeros(n - 1, dtype=F64), None, None, eye
    else:  # birkhoff: P >= 0, row sums 1, first n - 1 column sums 1
        N = n * n
        Q, G, h = torch.eye(N, dtype=F64), -torch.eye(N, dtype=F64), torch.zeros(N, dtype=F64)
        rows = torch.kron(torch.eye(n), torch.ones(1, n))
        cols = torch.kron(torch.ones(1, n), torch.eye(n))[: n - 1]
        A = torch.cat([rows, cols]).to(F64)
        b = torch.ones(2 * n - 1, dtype=F64)
    r = torch.arange(n - 1, -n, -2, dtype=F64)

    def to_qp(z: Tensor) -> QPData:
        B = z.shape[0]
        q = -(r[:, None] * z[:, None, :]).reshape(B, -1) if kind == "birkhoff" else -z

        def bat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.expand(B, *t.shape)

        return {"Q": bat(Q), "q": q, "G": bat(G), "h": bat(h), "A": bat(A), "b": bat(b)}

    return to_qp


def _native_sort_qp(kind: str, n: int, k: int) -> Callable[[Tensor], Tensor]:
    """The ``native`` backend's solver of ``sort_qp_problem(kind, n, k)``: its variable as a
    function of its parameter, flattened as the statement's."""
    if kind == "topk":
        return lambda z: sort_native.topk_projection(z, k)
    if kind == "isotonic":
        return sort_native.isotonic_regression
    r = torch.arange(n - 1, -n, -2, dtype=F64)  # birkhoff: the projection of r t'
    return lambda t: sort_native.birkhoff_projection(r[:, None] * t[:, None, :]).flatten(1)


def _sort_problem(kind: str, n: int, B: int, k: int, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    # scales that keep the solutions soft (fractional entries), so the active set is unique
    scale = {"topk": 1.0, "isotonic": n / 4, "birkhoff": 0.1}[kind]
    z = torch.randn(B, n, generator=g, dtype=F64) * scale

    def method(backend: str, tuned: bool) -> Callable[..., Tensor]:
        layer = sort_qp_layer(kind, n, k, backend, settings=_settings(tuned))
        return lambda z: layer.solve(z).reshape(z.shape[0], -1)

    methods, skipped = _collect(list(BACKENDS), method, _installed)
    methods["native"] = _native_sort_qp(kind, n, k)
    if kind == "topk":
        methods["neuralsort (closed form)"] = lambda z: neural_sort(z, 1.0)[:, :k].sum(-2)
        about = f"LP top-k membership, batch {B}, n {n}, k {k}"
    elif kind == "isotonic":
        methods["neuralsort (closed form)"] = lambda z: neural_sort(z, 1.0) @ z.unsqueeze(-1)
        about = f"LP sort over the permutahedron (isotonic QP), batch {B}, n {n}"
    else:
        methods["neuralsort (closed form)"] = lambda z: neural_sort(z, 1.0).reshape(B, -1)
        about = f"LP sort over the Birkhoff polytope, batch {B}, n {n} ({n * n} variables)"
    return Problem(
        f"lp-{kind}-{n}",
        "lp-sort",
        about,
        {"z": z},
        _sort_qp(kind, n, k),
        n * n if kind == "birkhoff" else n,
        methods,
        skipped,
        {"neuralsort (closed form)"},
    )


# name -> (layer, builder(quick, seed, cfg))
PROBLEMS: dict[str, Callable[[bool, int, CompareConfig], Problem]] = {
    "qp-small": lambda q, s, c: _qp_problem("small", q, s, c.max_diffcp_n),
    "qp-dense": lambda q, s, c: _qp_problem("dense", q, s, c.max_diffcp_n),
    "qp-sparse": lambda q, s, c: _qp_problem("sparse", q, s, c.max_diffcp_n),
    "tv-100": lambda q, s, c: _tv_problem(30 if q else 100, 8 if q else 32, s),
    "tv-500": lambda q, s, c: _tv_problem(60 if q else 500, 4 if q else 32, s),
    "tv2d": lambda q, s, c: _tv2d_problem(8 if q else 28, 2 if q else 8, s),
    "lp-isotonic": lambda q, s, c: _sort_problem(
        "isotonic", 8 if q else 16, 20 if q else 100, 0, s
    ),
    "lp-birkhoff": lambda q, s, c: _sort_problem("birkhoff", 5 if q else 16, 4 if q else 32, 0, s),
    "lp-topk": lambda q, s, c: _sort_problem("topk", 30 if q else 100, 20 if q else 100, 10, s),
}


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


@dataclass
class Reference:
    x: Tensor
    grads: dict[str, Tensor]
    ok: bool
    seconds: float


def problem_reference(prob: Problem, w: Tensor) -> Reference:
    """Solution and input gradients of ``<w, x>`` from the independent QP reference."""
    t0 = time.perf_counter()
    leaves = {k: v.detach().clone().requires_grad_() for k, v in prob.inputs.items()}
    data = prob.to_qp(*leaves.values())
    fixed = {k: None if v is None else v.detach() for k, v in data.items()}
    n_qp = data["q"].shape[-1]  # type: ignore[union-attr]
    direct: tuple[Tensor | None, ...] = (None,) * len(leaves)
    if prob.from_qp is None:  # the output is the first n_out QP variables
        gx = torch.cat([w, w.new_zeros(w.shape[0], n_qp - prob.n_out)], -1)
        ref = reference(fixed, gx)
        x = ref.x[:, : prob.n_out]
    else:  # solve, then the adjoint of output = from_qp(solution, inputs)
        z = reference(fixed, w.new_zeros(w.shape[0], n_qp)).x.requires_grad_()
        out = prob.from_qp(z, *leaves.values())
        gz, *direct = torch.autograd.grad((out * w).sum(), [z, *leaves.values()], allow_unused=True)
        ref = reference(fixed, gz)
        x = out.detach()
    outs = [(v, ref.grads[k]) for k, v in data.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(
        [o for o, _ in outs],
        list(leaves.values()),
        grad_outputs=[g for _, g in outs],
        allow_unused=True,
    )
    gd = {
        k: sum((t for t in (g, d) if t is not None), torch.zeros_like(v))
        for (k, v), g, d in zip(leaves.items(), grads, direct)
    }
    return Reference(x, gd, ref.ok, time.perf_counter() - t0)


def run_method(
    prob: Problem, name: str, w: Tensor, ref: Reference, cfg: CompareConfig
) -> dict[str, Any]:
    """Time, memory, solution and gradient errors of one method on one problem."""
    row: dict[str, Any] = {"problem": prob.name, "layer": prob.layer, "method": name}
    row["tuned"] = not name.endswith("(defaults)")
    row["device"] = cfg.device
    if name in prob.skipped:
        return {**row, "status": "skipped", "error": prob.skipped[name]}
    fn = prob.methods[name]
    try:
        with warnings.catch_warnings(), _time_limit(cfg.max_call_seconds):
            warnings.simplefilter("ignore")
            res = measure(lambda *a: fn(*a).reshape(w.shape), prob.inputs, w, cfg)  # type: ignore[arg-type]
    except _TimeLimit:
        return {
            **row,
            "status": "timeout",
            "error": f"did not finish its runs in --max_call_seconds {cfg.max_call_seconds:g} s",
        }
    except Exception as err:  # a failure is a result, not a crash
        msg = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        return {**row, "status": "failed", "error": f"{type(err).__name__}: {msg}"[:300]}
    row.update(
        status="ok",
        error="",
        fwd_ms=res["fwd_ms"],
        bwd_ms=res["bwd_ms"],
        fwd_bwd_ms=res["fwd_bwd_ms"],
        first_call_s=res["first_call_s"],
        peak_mem_mb=res["peak_mem_mb"],
    )
    if name in prob.closed_form:
        row["note"] = "different relaxation: timing reference only"
        return row
    row["x_err"] = rel_error(res["x"], ref.x)
    pairs = [(g, ref.grads[k]) for g, k in zip(res["grads"], prob.inputs)]
    total = math.sqrt(sum(float(r.norm()) ** 2 for _, r in pairs))
    diff = math.sqrt(
        sum(
            float(((torch.zeros_like(r) if g is None else g.detach().cpu().to(F64)) - r).norm())
            ** 2
            for g, r in pairs
        )
    )
    row["grad_err"] = math.inf if math.isnan(diff) else diff / max(total, 1e-300)
    for (g, r), k in zip(pairs, prob.inputs):
        if g is not None:
            row[f"grad_err_{k}"] = rel_error(g, r) if float(r.norm()) > 1e-12 * total else None
    return row


class _TimeLimit(BaseException):  # not caught by the layers' `except Exception`
    pass


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``_TimeLimit`` in the main thread after ``seconds`` (0: no limit). Solvers in C
    are interrupted when they next return to Python (diffcp: after the current element)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(*_: Any) -> None:
        raise _TimeLimit

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def accurate(row: dict[str, Any]) -> bool:
    return (
        row.get("status") == "ok"
        and row.get("x_err") is not None
        and row["x_err"] <= TARGET
        and row.get("grad_err") is not None
        and row["grad_err"] <= TARGET
    )


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per layer: the tuned method accurate on all its problems with the smallest geometric-mean
    forward+backward time."""
    out: dict[str, Any] = {}
    for layer in LAYERS:
        lrows = [r for r in rows if r["layer"] == layer]
        problems = sorted({r["problem"] for r in lrows})
        if not problems:
            continue
        scores = {}
        for m in sorted({r["method"] for r in lrows if r.get("tuned")}):
            mrows = [r for r in lrows if r["method"] == m]
            if len(mrows) == len(problems) and all(accurate(r) for r in mrows):
                logs = [math.log(r["fwd_bwd_ms"]) for r in mrows]
                scores[m] = math.exp(sum(logs) / len(logs))
        best = min(scores, key=scores.__getitem__) if scores else None
        out[layer] = {
            "backend": best,
            "problems": problems,
            "geomean_fwd_bwd_ms": scores,
        }
    return out


def current_defaults() -> dict[str, str]:
    """The default backend of each layer, read from the layers' signatures."""

    def default(fn: Callable[..., Any]) -> str:
        return inspect.signature(fn).parameters["backend"].default

    return {"qp": default(qp), "tv": default(tv_denoise), "lp-sort": DEFAULT_LP_BACKEND}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def report(out: Path, results: dict[str, dict[str, Any]]) -> str:
    """report.md from every ``results-<device>.json`` found (one column group per device)."""
    devices = sorted(results, key=lambda d: d != "cpu")
    main = results[devices[0]]
    rec = main["recommended"]
    lines = [
        "# Solver backends compared",
        "",
        f"Measured {main['date']}{' (--quick sizes)' if main['config']['quick'] else ''}, by:",
        "",
        *(f"* `{c}`" for c in main.get("commands", [f"{main['date']}: {main['command']}"])),
        "",
    ]
    for d in devices:
        m = results[d]["machine"]
        v = m["versions"]
        vtxt = ", ".join(f"{k} {x}" for k, x in v.items() if x)
        lines.append(
            f"**{d}**: {m.get('gpu') or m['processor']}, {m['cpu_count']} cores, "
            f"{m['torch_threads']} torch threads, load average "
            f"{', '.join(f'{x:.1f}' for x in m['load_average'] or [])}; {vtxt}.  "
        )
    if "cuda" not in "".join(devices):
        lines.append(
            "No GPU columns: this machine has no CUDA device "
            f"(torch.cuda.is_available() is {torch.cuda.is_available()}); run "
            "`python tasks/compare_backends.py --device cuda` on one to add them."
        )
    lines += [
        "",
        "Times are medians of forward and backward passes (ms); errors are relative to an "
        "independent reference (Clarabel's active set + exact KKT solve); **bold** marks each "
        f"problem's winner: the fastest method with solution and gradient errors <= {TARGET:g}. "
        "`(defaults)` rows use the solver's own settings, the others the library's. `timeout`: "
        "the method's warm-up, timed and memory runs on that problem together took longer than "
        "`--max_call_seconds`.",
        "",
        "## Recommended defaults",
        "",
        "| layer | recommended (this report) | library default | problems |",
        "|---|---|---|---|",
    ]
    defaults = current_defaults()
    for layer, r in rec.items():
        lines.append(
            f"| {layer} | {r['backend']} | {defaults[layer]} | {', '.join(r['problems'])} |"
        )
    for prob in main["problems"]:
        lines += ["", f"## {prob['name']}: {prob['about']}", ""]
        head = "| method |"
        sep = "|---|"
        for d in devices:
            head += f" {d} fwd | {d} bwd | {d} total | {d} peak MB |"
            sep += "---|---|---|---|"
        head += " x winner | x error | grad error | status |"
        sep += "---|---|---|---|"
        lines += [head, sep]
        by = {
            d: {r["method"]: r for r in results[d]["rows"] if r["problem"] == prob["name"]}
            for d in devices
        }
        winners = {}
        for d in devices:
            ok = [r for r in by[d].values() if accurate(r)]
            winners[d] = min(ok, key=lambda r: r["fwd_bwd_ms"])["method"] if ok else None
        for name in by[devices[0]]:
            base = by[devices[0]][name]
            cells = [f"**{name}**" if winners[devices[0]] == name else name]
            for d in devices:
                r = by[d].get(name, {})
                tot = _f(r.get("fwd_bwd_ms"), ".1f")
                if winners[d] == name:
                    tot = f"**{tot}**"
                cells += [
                    _f(r.get("fwd_ms"), ".1f"),
                    _f(r.get("bwd_ms"), ".1f"),
                    tot,
                    _f(r.get("peak_mem_mb"), ".0f"),
                ]
            status = base["status"]
            if base.get("error"):
                status += ": " + base["error"].replace("|", "/")[:120]
            if base.get("note"):
                status += f" ({base['note']})"
            win = by[devices[0]].get(winners[devices[0]] or "", {}).get("fwd_bwd_ms")
            ratio = base["fwd_bwd_ms"] / win if win and base.get("fwd_bwd_ms") else None
            cells += [
                _f(ratio, ".2g"),
                _f(base.get("x_err"), ".1e"),
                _f(base.get("grad_err"), ".1e"),
                status,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(
            f"\nReference: {prob['reference_seconds']:.1f} s, active sets certified: "
            f"{prob['reference_ok']}."
        )
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", text)
    return text


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({r["problem"] for r in rows})
    cols = min(3, len(problems))
    nrows = math.ceil(len(problems) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    methods = sorted({r["method"].replace(" (defaults)", "") for r in rows})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for ax, prob in zip(axes.flat, problems):
        for r in rows:
            if r["problem"] != prob or r.get("grad_err") is None or r.get("fwd_bwd_ms") is None:
                continue
            base = r["method"].replace(" (defaults)", "")
            ax.scatter(
                r["fwd_bwd_ms"],
                max(r["grad_err"], 1e-16),
                color=colors[base],
                marker="o" if r.get("tuned") else "x",
                label=r["method"],
            )
        ax.axhline(TARGET, color="k", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", title=prob, xlabel="forward+backward (ms)")
        ax.set_ylabel("gradient rel. error")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(problems) :]:
        ax.axis("off")
    fig.suptitle("o: library settings, x: solver defaults; dotted: 1e-5 target", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _merge(
    old: dict[str, Any], rows: list[dict[str, Any]], problems: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Old rows and problems with the new ones replacing those of the same key, in the old
    order (new problems last)."""
    order = {p["name"]: i for i, p in enumerate(old["problems"])}
    new_rows = {(r["problem"], r["method"]) for r in rows}
    new_probs = {p["name"] for p in problems}
    merged_rows = [r for r in old["rows"] if (r["problem"], r["method"]) not in new_rows] + rows
    merged_probs = [p for p in old["problems"] if p["name"] not in new_probs] + problems
    last = len(order)
    merged_rows.sort(key=lambda r: order.get(r["problem"], last))  # stable: method order kept
    merged_probs.sort(key=lambda p: order.get(p["name"], last))
    return merged_rows, merged_probs


def _write_recommendation(out: Path, result: dict[str, Any]) -> None:
    rec = {layer: r["backend"] for layer, r in result["recommended"].items() if r["backend"]}
    write_json(
        out / "recommended.json",
        {
            "recommended": rec,
            "rule": "fastest tuned backend (geometric mean of forward+backward time) whose "
            f"solution and gradient errors are <= {TARGET:g} on every problem of the layer",
            "measured": result["date"],
            "commands": result.get("commands", [result["command"]]),
        },
    )


def _rebuild_report(out: Path, merge_from: list[str]) -> dict[str, Any]:
    """Merge other runs' results into ``out`` (same device), then rewrite the report files."""
    for other in merge_from:
        for f in sorted(Path(other).glob("results-*.json")):
            path = out / f.name
            new = json.loads(f.read_text())
            if not path.exists():
                write_json(path, new)
                continue
            old = json.loads(path.read_text())
            rows, probs = _merge(old, new["rows"], new["problems"])
            old_cmds = old.get("commands", [f"{old['date']}: {old['command']}"])
            new_cmds = new.get("commands", [f"{new['date']}: {new['command']}"])
            merged = {**old, "rows": rows, "problems": probs, "commands": old_cmds + new_cmds}
            merged["recommended"] = recommend(rows)
            merged["complete"] = bool(old.get("complete", True) and new.get("complete", True))
            write_json(path, merged)
    files = sorted(out.glob("results-*.json"))
    if not files:
        raise UserError(f"--report_only: no results-*.json in {out}")
    results = {f.stem.removeprefix("results-"): json.loads(f.read_text()) for f in files}
    main_result = results.get("cpu") or next(iter(results.values()))
    if "cpu" in results:
        _write_recommendation(out, results["cpu"])
        write_csv(out / "results-cpu.csv", results["cpu"]["rows"])
    plot(main_result["rows"], out / "time_vs_error.png")
    report(out, results)
    print(f"report: {out / 'report.md'}")
    return main_result


def run(cfg: CompareConfig, argv: list[str] | None = None) -> dict[str, Any]:
    import sys

    set_up_torch(cfg.threads, cfg.device)
    out = Path(cfg.out)
    if cfg.report_only:
        return _rebuild_report(out, cfg.merge_from)
    out.mkdir(parents=True, exist_ok=True)
    names = cfg.problems or list(PROBLEMS)
    rows: list[dict[str, Any]] = []
    problems_info: list[dict[str, Any]] = []
    device_kind = "cuda" if cfg.device.startswith("cuda") else "cpu"
    command = "python tasks/compare_backends.py " + " ".join(sys.argv[1:] if argv is None else argv)
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    path = out / f"results-{device_kind}.json"
    base = json.loads(path.read_text()) if cfg.merge and path.exists() else None

    def save(done: bool) -> dict[str, Any]:
        """The results so far, written after every measurement: a crash loses one row."""
        all_rows, probs, commands = rows, problems_info, [f"{date}: {command}"]
        if base:  # replace the re-measured rows, keep the others
            all_rows, probs = _merge(base, rows, problems_info)
            commands = base.get("commands", [f"{base['date']}: {base['command']}"]) + commands
        result = {
            "command": command,
            "commands": commands,
            "date": date,
            "complete": done,
            "config": asdict(cfg),
            "machine": machine_info(cfg.device),
            "problems": probs,
            "rows": all_rows,
            "target": TARGET,
            "recommended": recommend(all_rows),
        }
        write_json(path, result)
        return result

    for pname in tqdm(names, desc="problems", disable=None):
        prob = PROBLEMS[pname](cfg.quick, cfg.seed, cfg)
        w = torch.randn(
            next(iter(prob.inputs.values())).shape[0],
            prob.n_out,
            generator=torch.Generator().manual_seed(cfg.seed + 1),
            dtype=F64,
        )
        ref = problem_reference(prob, w)
        problems_info.append(
            {
                "name": prob.name,
                "layer": prob.layer,
                "about": prob.about,
                "reference_seconds": ref.seconds,
                "reference_ok": ref.ok,
            }
        )
        todo = [m for m in [*prob.methods, *prob.skipped] if not cfg.methods or m in cfg.methods]
        for name in todo:
            row = run_method(prob, name, w, ref, cfg)
            rows.append(row)
            save(done=False)
            t = _f(row.get("fwd_bwd_ms"), ".1f")
            tqdm.write(
                f"{prob.name:>16} {name:<28} {row['status']:<7} {t:>9} ms  "
                f"x {_f(row.get('x_err'), '.1e')}  grad {_f(row.get('grad_err'), '.1e')}"
                + (f"  {row['error'][:80]}" if row.get("error") else ""),
            )
            sys.stdout.flush()
    result = save(done=True)
    rows = result["rows"]
    write_csv(out / f"results-{device_kind}.csv", rows)
    results = {
        f.stem.removeprefix("results-"): json.loads(f.read_text())
        for f in sorted(out.glob("results-*.json"))
    }
    if device_kind == "cpu":
        _write_recommendation(out, result)
    plot(rows, out / "time_vs_error.png")
    text = report(out, {k: v for k, v in results.items() if v["config"]["quick"] == cfg.quick})
    print("\n" + text.split("## ", 2)[1] if "## " in text else text)
    print(f"report: {out / 'report.md'}")
    return result
