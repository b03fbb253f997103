"""tasks/common/training.py: exact resume, atomic checkpoints, DDP ranks in sync."""

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
from tests.conftest import ROOT, run_task, task_env

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
    env = task_env(OMP_NUM_THREADS="1")
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


def _tiny_trainer(out, **kwargs):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(model, opt, out=out, config={"a": 1}, progress=False, **kwargs)


def _step(net, gen):
    loss = net(torch.randn(4, 2, generator=gen)).pow(2).mean()
    loss.backward()
    return {"loss": loss.item() / 3}  # a float with more than 6 significant digits


def _val(model):
    return {"val_acc": float(model.weight.sum()) / 7}


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated"])
def test_resume_from_an_unreadable_checkpoint_is_a_one_line_error(tmp_path, content):
    _tiny_trainer(tmp_path).fit(1, 2, _step, _val)
    (tmp_path / "ckpt.pt").write_bytes(content)
    with pytest.raises(UserError, match=r"ckpt\.pt is not a readable checkpoint.*delete it"):
        _tiny_trainer(tmp_path, resume=True)
    # end to end: one line, exit 2
    run_baseline.main([*TINY, "--num_epochs", "1", "--out", str(tmp_path / "b")])
    (tmp_path / "b" / "ckpt.pt").write_bytes(content)
    r = run_task(
        "run_baseline.py", *TINY, "--num_epochs", "2", "--out", str(tmp_path / "b"), "--resume"
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "not a readable checkpoint" in lines[0], (
        r.stderr
    )


def test_an_unwritable_metrics_file_keeps_the_epoch_s_checkpoint(tmp_path):
    (tmp_path / "metrics.csv").mkdir()  # unwritable as a file, for root too
    trainer = _tiny_trainer(tmp_path)
    with pytest.raises(UserError, match=r"cannot write .*metrics\.csv.*epoch 1 is saved"):
        trainer.fit(2, 2, _step, _val)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["epoch"] == 1


def test_resume_keeps_the_precision_of_earlier_metrics_rows(tmp_path):
    _tiny_trainer(tmp_path).fit(2, 2, _step, _val)
    before = (tmp_path / "metrics.csv").read_text().splitlines()
    # a third epoch's row left by a crash before its checkpoint: dropped on resume
    (tmp_path / "metrics.csv").write_text("\n".join([*before, before[-1].replace("2,", "3,", 1)]))
    _tiny_trainer(tmp_path, resume=True).fit(3, 2, _step, _val)
    after = (tmp_path / "metrics.csv").read_text().splitlines()
    assert after[:3] == before and len(after) == 4
    assert len(after[1].split(",")[1]) > 9  # full precision, not 6 significant digits


def test_a_temporary_file_left_by_a_killed_write_is_removed_at_the_next_start(tmp_path):
    _tiny_trainer(tmp_path).fit(1, 2, _step, _val)
    stale = [tmp_path / ".ckpt.pt.k1ll3d.tmp", tmp_path / ".best.pt.abc_12.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = tmp_path / "notes.tmp"
    keep.write_text("not ours")
    _tiny_trainer(tmp_path, resume=True)
    assert not any(p.exists() for p in stale) and keep.exists()
