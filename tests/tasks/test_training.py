"""tasks/training.py: exact resume, atomic checkpoints, DDP ranks in sync."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tasks import run_baseline
from tasks.common.cli import UserError, append_csv
from tasks.common.plots import metric_panels, plot_learning_curves
from tasks.common.training import Trainer
from tests.conftest import ROOT

TINY = ["--dataset", "digits", "--steps_per_epoch", "4", "--batch_size", "16", "--no-progress"]


def _weights(out):
    return torch.load(out / "ckpt.pt", weights_only=False)["model"]


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_baseline.main([*TINY, "--num_epochs", "2", "--out", str(straight)])
    run_baseline.main([*TINY, "--num_epochs", "1", "--out", str(split)])
    run_baseline.main([*TINY, "--num_epochs", "2", "--out", str(split), "--resume"])
    a, b = _weights(straight), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (split / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs


def test_crash_keeps_last_checkpoint(tmp_path):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = {"n": 0}

    def step(net, gen):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of epoch 2
            raise RuntimeError("simulated crash")
        net(torch.randn(4, 2, generator=gen)).pow(2).mean().backward()
        return {"loss": 0.0}

    trainer = Trainer(model, opt, out=tmp_path, config={"a": 1}, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(3, 3, step, lambda m: {"val_acc": 0.5})
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["epoch"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # a new run does not overwrite it; a resumed run picks up after epoch 1
    with pytest.raises(UserError, match="--resume"):
        Trainer(nn.Linear(2, 1), opt, out=tmp_path, config={"a": 1}, progress=False)
    again = Trainer(model, opt, out=tmp_path, config={"a": 1}, resume=True, progress=False)
    assert again.start_epoch == 1
    with pytest.raises(UserError, match="other flags"):
        Trainer(model, opt, out=tmp_path, config={"a": 2}, resume=True, progress=False)


def test_resume_accepts_a_flag_added_since_at_its_default(tmp_path):
    run_baseline.main([*TINY, "--num_epochs", "1", "--out", str(tmp_path)])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    del ckpt["config"]["augment"]  # as if written before --augment existed
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match=r"--augment 0 \(now 2\)"):
        run_baseline.main(
            [*TINY, "--num_epochs", "2", "--out", str(tmp_path), "--resume", "--augment", "2"]
        )
    run_baseline.main([*TINY, "--num_epochs", "2", "--out", str(tmp_path), "--resume"])
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("script", ["run_baseline.py", "run_dknn.py"])
def test_ddp_two_cpu_ranks_end_identical(tmp_path, script):
    extra = (
        ["--batch_size", "16"]
        if script == "run_baseline.py"
        else ["--num_train_queries", "16", "--num_train_neighbors", "16"]
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000 + (script == "run_dknn.py")),
        str(ROOT / "tasks" / script),
        "--dataset",
        "digits",
        "--num_epochs",
        "1",
        "--steps_per_epoch",
        "3",
        "--no-progress",
        "--out",
        str(tmp_path),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    check = json.loads((tmp_path / "ddp_check.json").read_text())
    assert check["world_size"] == 2
    d0, d1 = check["digests"]
    assert d0 == d1


def test_append_csv_keeps_columns_aligned_when_a_resumed_run_adds_one(tmp_path):
    path = tmp_path / "metrics.csv"
    append_csv(path, {"epoch": 1, "val": 0.5})
    append_csv(path, {"epoch": 2, "val": 0.6, "val_select": 0.61})  # a newer script resumed it
    append_csv(path, {"epoch": 3, "val_select": 0.7})  # and one without a column
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [
        {"epoch": "1", "val": "0.5", "val_select": ""},
        {"epoch": "2", "val": "0.6", "val_select": "0.61"},
        {"epoch": "3", "val": "", "val_select": "0.7"},
    ]
    plot_learning_curves(path, tmp_path / "curves.png")  # the blanks are gaps, not an error
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_learning_curves_put_every_task_s_accuracies_beside_each_other_not_with_the_losses():
    keys = ["train_loss", "val_acc", "val_exact", "val_elementwise", "val_select_acc", "val_mse"]
    losses, accuracies = metric_panels(keys)
    assert losses == ["train_loss", "val_mse"]
    assert accuracies == ["val_acc", "val_exact", "val_elementwise", "val_select_acc"]
