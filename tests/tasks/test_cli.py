"""tasks/common/cli.py and the scripts' flags: every bad command line is one line on stderr, exit
status 2, before anything is written (the shared checks of --out, --device and NaN, and each
script's own ranges)."""

from __future__ import annotations

import pytest
import torch

from tasks import (
    bench_qp,
    bench_sort,
    bench_sort_step,
    bench_tv,
    compare_backends,
    profile_qp,
    run_baseline,
    run_denoise,
    run_dknn,
    run_knn,
    run_sort,
)
from tests.conftest import run_task

SCRIPTS = {
    "run_dknn": run_dknn,
    "run_baseline": run_baseline,
    "run_knn": run_knn,
    "run_sort": run_sort,
    "run_denoise": run_denoise,
    "bench_tv": bench_tv,
    "bench_sort": bench_sort,
    "bench_sort_step": bench_sort_step,
    "bench_qp": bench_qp,
    "compare_backends": compare_backends,
    "profile_qp": profile_qp,
}
WITH_DEVICE = ["run_dknn", "run_baseline", "run_knn", "run_sort", "run_denoise", "bench_sort"]
WITH_DEVICE += ["bench_qp", "compare_backends"]


def _refused(capsys, script: str, argv: list[str], needle: str, folder) -> None:
    with pytest.raises(SystemExit) as exit_:
        SCRIPTS[script].main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert needle in lines[0], lines
    assert not any(p for p in folder.rglob("*") if p.name != "taken")  # nothing written


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_out_naming_a_file_is_refused(script, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    _refused(capsys, script, ["--out", str(taken)], "is a file, not a folder", tmp_path)
    assert taken.read_text() == "not a folder"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_out_below_a_file_is_refused(script, tmp_path, capsys):
    # unwritable for root too: a folder cannot be made inside a file
    (tmp_path / "taken").write_text("")
    argv = ["--out", str(tmp_path / "taken" / "run")]
    _refused(capsys, script, argv, "taken is a file, not a folder", tmp_path)


def test_out_in_a_read_only_folder_is_refused_for_a_normal_user(tmp_path, monkeypatch, capsys):
    import os

    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode)
    )
    _refused(capsys, "run_knn", ["--out", str(tmp_path / "run")], "is not writable", tmp_path)


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
@pytest.mark.parametrize("script", WITH_DEVICE)
def test_device_missing_here_is_refused(script, tmp_path, capsys):
    argv = ["--device", "cuda:7", "--out", str(tmp_path / "run")]
    _refused(capsys, script, argv, "--device cuda:7", tmp_path)


def test_device_that_is_no_device_is_refused(tmp_path, capsys):
    argv = ["--device", "gpu", "--out", str(tmp_path / "run")]
    _refused(capsys, "run_dknn", argv, "not a torch device", tmp_path)


@pytest.mark.parametrize(
    ("script", "argv", "needle"),
    [
        ("run_dknn", ["--steps_per_epoch", "-5"], "--steps_per_epoch must be >= 0"),
        ("run_baseline", ["--steps_per_epoch", "-3"], "--steps_per_epoch must be >= 0"),
        ("run_dknn", ["--nloglr", "-1"], "--nloglr must be > 0"),
        ("run_baseline", ["--nloglr", "0"], "--nloglr must be > 0"),
        ("run_dknn", ["--momentum", "-1"], "--momentum must be >= 0"),
        ("run_dknn", ["--momentum", "1"], "--momentum must be in [0, 1)"),
        ("run_baseline", ["--weight_decay", "-1"], "--weight_decay must be >= 0"),
        ("run_dknn", ["--tau", "nan"], "--tau must be a finite number"),
        ("run_knn", ["--chunk_size", "0"], "--chunk_size must be >= 1"),
        ("run_sort", ["--val_sequences", "0"], "--val_sequences must be >= 1"),
        ("run_sort", ["--test_sequences", "0"], "--test_sequences must be >= 1"),
        ("run_sort", ["--lr", "nan"], "--lr must be a finite number"),
        ("bench_tv", ["--quick", "--lam", "-1"], "--lam must be > 0"),
        ("bench_tv", ["--lam", "nan"], "--lam must be a finite number"),
        ("bench_tv", ["--fd_eps", "0"], "--fd_eps must be > 0"),
        ("bench_sort", ["--ns", "0"], "--ns must be >= 2"),
        ("bench_sort", ["--quick", "--ns", "0"], "--ns must be >= 2"),
        ("bench_sort", ["--tau", "inf"], "--tau must be a finite number"),
        ("bench_sort", ["--max_seconds", "0"], "--max_seconds must be > 0"),
        ("bench_sort_step", ["--n", "1"], "--n must be >= 2"),
        ("bench_qp", ["--threads", "-1"], "--threads must be >= 0"),
        ("compare_backends", ["--max_call_seconds", "-1"], "--max_call_seconds must be >= 0"),
        ("run_denoise", ["--lr_tv", "-1"], "--lr_tv must be > 0"),
        ("run_denoise", ["--optnet_lam", "-1"], "--optnet_lam must be > 0"),
        ("run_denoise", ["--d_penalty", "-0.1"], "--d_penalty must be >= 0"),
    ],
)
def test_out_of_range_flags_are_refused(script, argv, needle, tmp_path, capsys):
    _refused(capsys, script, [*argv, "--out", str(tmp_path / "run")], needle, tmp_path)


def test_run_denoise_resume_with_nothing_to_resume_is_refused(tmp_path):
    r = run_task("run_denoise.py", "--quick", "--resume", "--out", str(tmp_path), "--no-progress")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "no run of" in lines[0], r.stderr
    assert not any(tmp_path.iterdir())


def test_missing_device_end_to_end_is_one_line(tmp_path):
    r = run_task("run_knn.py", "--device", "cuda:7", "--out", str(tmp_path / "run"))
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--device cuda:7" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not any(tmp_path.iterdir())
