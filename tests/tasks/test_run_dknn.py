"""tasks/run_dknn.py: a short run end to end, its one-line errors, and resume safety."""

from __future__ import annotations

import json

import pytest

from tasks import run_dknn
from tasks.common.cli import UserError
from tests.conftest import assert_one_line_error, run_task

TINY = ["--dataset", "digits", "--num_train_queries", "16", "--num_train_neighbors", "32"]
TINY += ["--steps_per_epoch", "3", "--no-progress"]


def test_short_run_writes_results_and_augment_changes_training(tmp_path):
    plain = run_dknn.main([*TINY, "--num_epochs", "1", "--out", str(tmp_path / "a")])
    shifted = run_dknn.main(
        [*TINY, "--num_epochs", "1", "--augment", "1", "--out", str(tmp_path / "b")]
    )
    for r in (plain, shifted):
        assert 0.0 <= r["test_acc"] <= 1.0 and r["pixel_knn_test_acc"] > 0.9
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["config"]["augment"] == 1
    assert (tmp_path / "a" / "metrics.csv").read_text().count("\n") == 2


def _cli(*args):
    return run_task("run_dknn.py", *args)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--k", "40"], "larger than --num_train_neighbors"),
        (["--tau", "0"], "--tau must be > 0"),
        (["--sort", "bogosort"], "invalid choice"),
        (["--dataset", "imagenet"], "invalid choice"),
        (["--augment", "-1"], "--augment must be >= 0"),
    ],
)
def test_cli_errors_are_one_line(args, needle, tmp_path):
    r = _cli(*TINY, *args, "--out", str(tmp_path))
    assert_one_line_error(r, needle, tmp_path)


def test_resume_with_other_flags_is_refused_and_keeps_the_checkpoint(tmp_path):
    run_dknn.main([*TINY, "--num_epochs", "1", "--out", str(tmp_path)])
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(UserError, match="other flags"):
        run_dknn.main([*TINY, "--num_epochs", "2", "--k", "5", "--out", str(tmp_path), "--resume"])
    assert (tmp_path / "ckpt.pt").read_bytes() == before
