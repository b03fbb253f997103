"""tasks/compare_backends.py: the report's figures, its recommendation and the layers' defaults."""

from __future__ import annotations

import json

import pytest
import torch

from tasks import compare_backends as cb
from tasks.backends import compare
from tests.conftest import ROOT

RECOMMENDED = ROOT / "results" / "backends" / "recommended.json"


def test_layer_defaults_follow_the_committed_recommendation():
    """The defaults are what the full comparison recommends; re-run it and update the defaults
    (or the file) together."""
    assert RECOMMENDED.exists(), "run python tasks/compare_backends.py and commit its results"
    rec = json.loads(RECOMMENDED.read_text())["recommended"]
    defaults = compare.current_defaults()
    for layer, backend in rec.items():
        assert defaults[layer] == backend, (
            f"the {layer} layer's default backend is {defaults[layer]!r} but "
            f"{RECOMMENDED} recommends {backend!r}"
        )
    assert set(rec) == set(compare.LAYERS)


@pytest.mark.parametrize("name", ["lp-topk", "lp-birkhoff", "tv-100", "qp-small"])
def test_reference_agrees_with_the_layers(name):
    """The independent reference and the layers' default backends give the same solution and
    gradients (either side could be wrong)."""
    cfg = cb.CompareConfig(quick=True)
    cfg.validate()
    prob = compare.PROBLEMS[name](True, 0, cfg)
    B = next(iter(prob.inputs.values())).shape[0]
    w = torch.randn(B, prob.n_out, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = compare.problem_reference(prob, w)
    assert ref.ok
    default = compare.current_defaults()[prob.layer]
    row = compare.run_method(prob, default, w, ref, cfg)
    assert row["status"] == "ok", row
    assert row["x_err"] < 1e-6 and row["grad_err"] < 1e-6, row


def test_quick_run_writes_report_json_plot_and_recommendation(tmp_path):
    out = tmp_path / "cmp"
    res = cb.main(
        [
            "--quick",
            "--problems", "qp-small", "lp-topk", "tv-100",
            "--methods", "torch-ipm", "moreau", "native", "qpth", "diffcp-clarabel (defaults)",
            "neuralsort (closed form)",
            "--out", str(out),
        ]
    )  # fmt: skip
    for f in ("report.md", "results-cpu.json", "results-cpu.csv", "time_vs_error.png"):
        assert (out / f).stat().st_size > 0, f
    rows = json.loads((out / "results-cpu.json").read_text())["rows"]
    assert {r["problem"] for r in rows} == {"qp-small", "lp-topk-30", "tv-30"}
    ok = [r for r in rows if r["status"] == "ok" and r.get("grad_err") is not None]
    assert ok and all(r["fwd_bwd_ms"] > 0 for r in ok)
    # the solvers' default settings are measurably less accurate than the library's
    loose = [r for r in rows if r["method"] == "diffcp-clarabel (defaults)"]
    assert loose and all(r["grad_err"] > 1e-7 for r in loose if r["status"] == "ok")
    closed = [r for r in rows if r["method"] == "neuralsort (closed form)"]
    assert closed and closed[0].get("x_err") is None
    rec = json.loads((out / "recommended.json").read_text())["recommended"]
    assert rec == {k: v["backend"] for k, v in res["recommended"].items()}
    # one TV problem here: the recommendation is its fastest accurate tuned method (which one
    # wins at this tiny size depends on the machine's load: native and torch-ipm are close)
    tv = [r for r in rows if r["layer"] == "tv" and r.get("tuned") and compare.accurate(r)]
    assert "native" in {r["method"] for r in tv}
    assert rec["tv"] == min(tv, key=lambda r: r["fwd_bwd_ms"])["method"]
    report = (out / "report.md").read_text()
    assert "## lp-topk-30" in report and "**" in report
    assert "No GPU columns" in report or torch.cuda.is_available()


def test_time_limit_stops_a_slow_method():
    cfg = cb.CompareConfig(quick=True, max_call_seconds=0.05)
    cfg.validate()
    prob = compare.PROBLEMS["tv-100"](True, 0, cfg)
    w = torch.ones(8, prob.n_out, dtype=torch.float64)
    ref = compare.problem_reference(prob, w)
    prob.methods["slow"] = lambda *a: __import__("time").sleep(5) or a[0]
    row = compare.run_method(prob, "slow", w, ref, cfg)
    assert row["status"] == "timeout"


def test_unknown_problem_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cb.main(["--problems", "qp-huge"])
    assert exc.value.code == 2
    assert "unknown problems ['qp-huge']" in capsys.readouterr().err


def test_merge_replaces_only_the_rows_measured_again(tmp_path):
    out = str(tmp_path / "m")
    common = ["--quick", "--problems", "lp-topk", "--out", out]
    cb.main([*common, "--methods", "moreau", "torch-ipm"])
    first = json.loads((tmp_path / "m" / "results-cpu.json").read_text())["rows"]
    cb.main([*common, "--methods", "torch-ipm", "--merge"])
    merged = json.loads((tmp_path / "m" / "results-cpu.json").read_text())
    assert [r["method"] for r in merged["rows"]] == ["moreau", "torch-ipm"]
    assert merged["rows"][0] == next(r for r in first if r["method"] == "moreau")  # kept
    assert len(merged["commands"]) == 2


def test_report_only_merges_runs_made_apart(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cb.main(["--quick", "--problems", "lp-topk", "--methods", "moreau", "--out", a])
    cb.main(["--quick", "--problems", "tv-100", "--methods", "native", "--out", b])
    cb.main(["--report_only", "--merge_from", b, "--out", a])
    merged = json.loads((tmp_path / "a" / "results-cpu.json").read_text())
    assert [p["name"] for p in merged["problems"]] == ["lp-topk-30", "tv-30"]
    rec = json.loads((tmp_path / "a" / "recommended.json").read_text())["recommended"]
    assert rec == {"lp-sort": "moreau", "tv": "native"}
    assert "## tv-30" in (tmp_path / "a" / "report.md").read_text()
