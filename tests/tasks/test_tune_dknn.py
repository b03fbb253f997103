"""tasks/tune_dknn.py: the dKNN tuning sweep, its choice and its one-line errors."""

from __future__ import annotations

import json

import pytest

from tasks import tune_dknn
from tasks.common.tuning import choose
from tests.conftest import assert_one_line_error, run_task

TINY = ["--dataset", "digits", "--num_train_queries", "16", "--num_train_neighbors", "32"]
TINY += ["--steps", "2", "--no-progress"]


def test_sweep_trains_every_point_once_with_its_method_and_resumes(tmp_path):
    out = tmp_path / "tune"
    args = [*TINY, "--sorts", "neuralsort-stochastic", "lp-topk", "--taus", "2", "8", "--out"]
    first = tune_dknn.main([*args, str(out)])
    assert {(r["sort"], r["tau"]) for r in first["rows"]} == {
        (s, t) for s in ("neuralsort-stochastic", "lp-topk") for t in (2.0, 8.0)
    }
    for r in first["rows"]:  # each point: one epoch of --steps steps, its own tau and method
        res = json.loads((out / r["run"] / "results.json").read_text())
        cfg = res["config"]
        want = (
            ("neuralsort", "stochastic")
            if r["sort"] == "neuralsort-stochastic"
            else (
                "lp-topk",
                "deterministic",
            )
        )
        assert (cfg["sort"], cfg["method"]) == want
        assert (cfg["tau"], cfg["num_epochs"], cfg["steps_per_epoch"]) == (r["tau"], 1, 2)
        assert res["pixel_knn_test_acc"] is None and res["init_embedding_test_acc"] is None
        assert res["minutes"] > 0 and res["machine"]["cpu_model"]
    assert all(r["score_spread"] > 0 and r["spread_over_tau"] > 0 for r in first["rows"])
    saved = json.loads((out / "tuning.json").read_text())
    assert saved["chosen"] == choose(saved["rows"], "val_acc")
    assert (out / "tuning.csv").read_text().count("\n") == 5 and (out / "tuning.png").exists()
    stamp = (out / "lp-topk-tau2" / "results.json").stat().st_mtime_ns
    again = tune_dknn.main([*args, str(out)])  # finished points are read, not retrained
    assert (out / "lp-topk-tau2" / "results.json").stat().st_mtime_ns == stamp
    assert again["rows"] == first["rows"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sorts", "bitonic"], "--sorts must name"),
        (["--taus", "-1"], "--taus must be positive"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, tmp_path):
    out = ["--out", str(tmp_path / "o")]
    assert_one_line_error(run_task("tune_dknn.py", *TINY, *flags, *out), message, tmp_path)
