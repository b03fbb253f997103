"""tasks/run_knn.py: end to end on embedded data, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from tasks import run_knn
from tests.conftest import assert_one_line_error, run_task


def test_run_knn_digits(tmp_path):
    rows = run_knn.main(["--dataset", "digits", "--k", "1", "3", "--out", str(tmp_path)])
    assert len(rows) == 2 * 2 * 2  # features x k x weighting
    assert sum(r["selected"] for r in rows) == 2  # one per feature set
    best = max(r["test_acc"] for r in rows)
    assert best > 0.95  # 8x8 digits: kNN is about 98 %
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["dataset"] == "digits" and len(saved["rows"]) == 8
    assert (tmp_path / "results.csv").read_text().count("\n") == 9


def _cli(*args):
    return run_task("run_knn.py", *args)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dataset", "imagenet"], "invalid choice"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent/dir"], "--download"),
        (["--dataset", "digits", "--k", "0"], "positive"),
        (["--dataset", "digits", "--k", "5000"], "larger than"),
        (["--dataset", "digits", "--k", "three"], "invalid int"),
    ],
)
def test_cli_errors_are_one_line(args, needle, tmp_path):
    r = _cli(*args, "--out", str(tmp_path))
    assert_one_line_error(r, needle, tmp_path)
