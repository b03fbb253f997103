"""tasks/run_denoise.py and its data: the OptNet denoising generator's statistics, the TV baseline,
the script's flag errors and a smoke run."""

from __future__ import annotations

import pytest
import torch

from layers import difference_matrix, tv_denoise
from tasks.common.cli import UserError
from tasks.common.data import denoising_splits, make_denoising_data

F64 = torch.float64


# ----------------------------------------------------------------------------- data
def test_denoising_generator_statistics():
    noisy, clean = make_denoising_data(2000, seed=0)
    assert noisy.shape == clean.shape == (2000, 100) and noisy.dtype == torch.float32
    noise = (noisy - clean).double()
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 10.0) < 0.05
    assert clean.min() >= 10 and clean.max() <= 99 and torch.equal(clean, clean.round())
    jumps = (clean[:, 1:] != clean[:, :-1]).sum(1)
    assert jumps.max() <= 8  # at most 9 segments
    assert 3.0 < jumps.double().mean().item() < 4.5  # U{1..9} segments, some equal heights
    assert (jumps == 0).any()  # one-segment signals occur
    again, _ = make_denoising_data(2000, seed=0)
    assert torch.equal(noisy, again)
    tr_x, _, te_x, _ = denoising_splits()
    assert tr_x.shape == (9000, 100) and te_x.shape == (1000, 100)


@pytest.mark.slow
def test_tv_baseline_reproduces_optnet_number():
    """TV at lam = 21 on the first 1,500 training signals: MSE about 15.7 (issue #6)."""
    tr_x, tr_y, _, _ = denoising_splits()
    D = difference_matrix(100, dtype=F64)
    x = tv_denoise(tr_x[:1500].double(), D, 21.0)
    mse = ((x - tr_y[:1500].double()) ** 2).mean().item()
    assert 15.0 < mse < 16.5


# ----------------------------------------------------------------------------- task script
def test_run_denoise_flag_errors(capsys):
    from tasks import run_denoise

    with pytest.raises(SystemExit) as exit_:
        run_denoise.main(["--models", "optnet_tv"])
    assert exit_.value.code == 2 and "add tv to --models" in capsys.readouterr().err


@pytest.mark.slow
def test_run_denoise_quick(tmp_path):
    from tasks import run_denoise

    res = run_denoise.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    rows = {r["model"]: r for r in res["rows"]}
    assert set(rows) == {"fc", "tv", "optnet_tv", "optnet"}
    assert 10 < rows["tv"]["test_mse"] < 25
    for f in ("report.md", "results.json", "examples.png", "D_heatmap.png", "loss_curves.png"):
        assert (tmp_path / f).exists(), f
    with pytest.raises(UserError, match="--resume"):
        run_denoise.main(["--quick", "--out", str(tmp_path), "--no-progress"])
