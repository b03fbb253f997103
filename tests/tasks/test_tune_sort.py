"""tasks/tune_sort.py: the tuning protocol's sweep, its choice and its one-line errors."""

from __future__ import annotations

import json

import pytest

from tasks import tune_sort
from tasks.common.tuning import choose, edge_choices
from tests.conftest import assert_one_line_error, run_task

TINY = ["--dataset", "mnist5k", "--n", "3", "--batch_size", "4", "--steps", "2"]
TINY += ["--val_sequences", "20", "--test_sequences", "20", "--no-progress"]


def test_choice_is_the_best_validation_and_ties_go_to_the_smaller_tau():
    rows = [
        {"sort": "a", "tau": 1.0, "val_exact": 0.5},
        {"sort": "a", "tau": 0.3, "val_exact": 0.5},
        {"sort": "a", "tau": 3.0, "val_exact": 0.4},
        {"sort": "b", "tau": 3.0, "val_exact": 0.7},
        {"sort": "b", "tau": 1.0, "val_exact": 0.6},
    ]
    assert choose(rows) == {"a": 0.3, "b": 3.0}
    # a choice at the smallest or largest tau of its grid may lie beyond it: flagged
    assert edge_choices(rows, choose(rows)) == ["a", "b"]
    wider = [*rows, {"sort": "a", "tau": 0.1, "val_exact": 0.2}]
    assert choose(wider)["a"] == 0.3 and edge_choices(wider, choose(wider)) == ["b"]
    assert edge_choices(rows[:1], {"a": 1.0}) == []  # one point: no grid to extend


def test_sweep_trains_every_point_once_and_resumes(tmp_path):
    out = tmp_path / "tune"
    args = [*TINY, "--sorts", "neuralsort", "lp-permutahedron", "--taus", "0.5", "2", "--out"]
    first = tune_sort.main([*args, str(out)])
    assert {(r["sort"], r["tau"]) for r in first["rows"]} == {
        (s, t) for s in ("neuralsort", "lp-permutahedron") for t in (0.5, 2.0)
    }
    for r in first["rows"]:  # each point: one epoch of --steps steps, with its own tau
        cfg = json.loads((out / r["run"] / "config.json").read_text())
        assert (cfg["sort"], cfg["tau"], cfg["num_epochs"], cfg["steps_per_epoch"]) == (
            r["sort"],
            r["tau"],
            1,
            2,
        )
    assert all(r["score_spread"] > 0 and r["spread_over_tau"] > 0 for r in first["rows"])
    saved = json.loads((out / "tuning.json").read_text())
    assert saved["chosen"] == choose(saved["rows"])
    assert (out / "tuning.csv").read_text().count("\n") == 5 and (out / "tuning.png").exists()
    stamp = (out / "neuralsort-tau0.5" / "results.json").stat().st_mtime_ns
    again = tune_sort.main([*args, str(out)])  # finished points are read, not retrained
    assert (out / "neuralsort-tau0.5" / "results.json").stat().st_mtime_ns == stamp
    assert again["rows"] == first["rows"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sorts", "bitonic"], "--sorts must name"),
        (["--taus", "0"], "--taus must be positive"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, tmp_path):
    out = ["--out", str(tmp_path / "o")]
    assert_one_line_error(run_task("tune_sort.py", *TINY, *flags, *out), message, tmp_path)
