"""tasks/run_sort.py and its data: multi-digit sequences, the true permutation, accuracies,
regrouping, a short run of every relaxation end to end, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from tasks import run_sort
from tasks.data import MultiDigitSequences
from tasks.models import SortCNN
from tests.conftest import assert_one_line_error, run_task

TINY = ["--dataset", "mnist5k", "--n", "3", "--batch_size", "4", "--steps_per_epoch", "2"]
TINY += ["--val_sequences", "20", "--test_sequences", "20", "--no-progress"]


def test_sequences_show_the_numbers_they_claim():
    # Digit d is drawn as a constant image of value d: each 28x28 block shows its digit.
    labels = torch.arange(10).repeat(3)
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()
    seqs = MultiDigitSequences(images, labels, n=5, num_digits=4)
    x, values = seqs.sample(7, torch.Generator().manual_seed(0))
    assert x.shape == (7, 5, 1, 28, 112) and values.shape == (7, 5)
    drawn = x[..., 0, 0, ::28]  # top-left pixel of each digit block, left to right
    assert torch.equal((drawn * torch.tensor([1000.0, 100.0, 10.0, 1.0])).sum(-1), values)
    again = seqs.fixed(7, seed=0)
    assert torch.equal(again[1], values)


def test_true_permutation_and_accuracies():
    values = torch.tensor([[3.0, 9.0, 1.0]])
    p = run_sort.true_permutation(values)
    assert torch.equal(p[0], torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]))
    assert run_sort.sort_accuracy(torch.tensor([[0.5, 2.0, -1.0]]), values) == (1.0, 1.0)
    exact, elementwise = run_sort.sort_accuracy(torch.tensor([[-1.0, 2.0, 0.5]]), values)
    assert exact == 0.0 and elementwise == pytest.approx(1 / 3)


def test_regroup_puts_every_item_in_that_many_sequences():
    pick = run_sort.regroup(12, 3, 4, torch.Generator().manual_seed(0))
    assert pick.shape == (16, 3)
    assert torch.equal(torch.bincount(pick.flatten(), minlength=12), torch.full((12,), 4))
    assert all(len(set(row.tolist())) == 3 for row in pick)  # no item twice in one sequence


def test_cnn_scores_each_image():
    net = SortCNN(num_digits=2)
    x = torch.rand(6, 1, 28, 56)
    assert net(x).shape == (6,)
    assert torch.allclose(net(x[2:3]), net(x)[2:3], atol=1e-5)


@pytest.mark.parametrize("sort", run_sort.SORTS)
def test_every_relaxation_trains_end_to_end(sort, tmp_path):
    out = tmp_path / sort
    r = run_sort.main([*TINY, "--sort", sort, "--num_epochs", "1", "--out", str(out)])
    assert 0.0 <= r["test_exact"] <= r["test_elementwise"] <= 1.0
    assert r["seconds_per_step"] > 0 and r["steps"] == 2
    assert json.loads((out / "results.json").read_text())["config"]["sort"] == sort
    assert (tmp_path / "summary.md").is_file()


def test_groupings_changes_training_and_is_recorded(tmp_path):
    args = [*TINY, "--num_epochs", "1"]
    plain = run_sort.main([*args, "--out", str(tmp_path / "a")])
    more = run_sort.main([*args, "--groupings", "3", "--out", str(tmp_path / "b")])
    loss = [(tmp_path / d / "metrics.csv").read_text().splitlines()[1] for d in "ab"]
    assert loss[0] != loss[1]
    assert more["config"]["groupings"] == 3 and plain["config"]["groupings"] == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--n", "1"], "--n must be >= 2"),
        (["--tau", "0"], "--tau must be > 0"),
        (["--groupings", "0"], "--groupings must be >= 1"),
        (["--sort", "bogosort"], "invalid choice"),
    ],
)
def test_cli_errors_are_one_line(args, needle, tmp_path):
    r = run_task("run_sort.py", *TINY, *args, "--out", str(tmp_path))
    assert_one_line_error(r, needle, tmp_path)
