"""tasks/run_sort.py and its data: multi-digit sequences, the true permutation, accuracies,
regrouping, a short run of every relaxation end to end, and one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tasks import run_sort
from tasks.common.data import MultiDigitSequences
from tasks.common.models import SortCNN
from tasks.common.plots import read_csv
from tasks.sort import summary as sort_summary
from tasks.sort import train as sort_train
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


def test_tied_sequences_share_their_leading_digits():
    labels = torch.arange(10).repeat(3)
    images = (labels.float() + torch.arange(30) / 40).view(-1, 1, 1, 1)  # digit . image
    seqs = MultiDigitSequences(images.expand(-1, 1, 28, 28).contiguous(), labels, n=5)
    x, values = seqs.sample(200, torch.Generator().manual_seed(0), tied=1.0)
    drawn = x[..., 0, 0, ::28]  # (200, 5, 4): digit + image number / 40, per block
    assert torch.equal((drawn.floor() * torch.tensor([1000.0, 100, 10, 1])).sum(-1), values)
    digits = drawn.floor()
    shared = (digits == digits[:, :1]).all(1).long().cumprod(-1).sum(-1)  # leading digits
    assert (shared >= 1).all() and (shared == 1).any() and (shared == 2).any()
    assert ((drawn - drawn[:, :1]).abs().sum((1, 2)) > 0).all()  # other images of them
    _, some = seqs.sample(400, torch.Generator().manual_seed(1), tied=0.5)
    share = (some // 1000 == some[:, :1] // 1000).all(-1).float().mean().item()
    assert 0.4 < share < 0.65  # half tied, plus the few untied sequences sharing by chance
    _, plain = seqs.sample(50, torch.Generator().manual_seed(2))
    assert torch.equal(seqs.sample(50, torch.Generator().manual_seed(2), tied=0.0)[1], plain)
    no_sevens = MultiDigitSequences(
        torch.zeros(9, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5, 6, 8, 9]), 5
    )
    with pytest.raises(ValueError, match=r"every digit; none of \[7\]"):
        no_sevens.sample(2, tied=0.5)


def test_true_permutation_and_accuracies():
    values = torch.tensor([[3.0, 9.0, 1.0]])
    p = sort_train.true_permutation(values)
    assert torch.equal(p[0], torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]))
    assert sort_train.sort_accuracy(torch.tensor([[0.5, 2.0, -1.0]]), values) == (1.0, 1.0)
    exact, elementwise = sort_train.sort_accuracy(torch.tensor([[-1.0, 2.0, 0.5]]), values)
    assert exact == 0.0 and elementwise == pytest.approx(1 / 3)


def test_pair_errors_by_digit():
    values = torch.tensor([[1234.0, 1299.0, 5000.0, 1235.0]])
    # 5000 > 1299 > 1235 > 1234: the leading digit decides 3 pairs, the third 2, the last 1
    right = torch.tensor([[1.0, 3.0, 4.0, 2.0]])
    assert sort_train.pair_errors_by_digit(right, values, 4) == ([0, 0, 0, 0], [3, 0, 2, 1])
    swapped = torch.tensor([[2.0, 3.0, 4.0, 1.0]])  # 1234 above 1235: the last digit's pair
    assert sort_train.pair_errors_by_digit(swapped, values, 4) == ([0, 0, 0, 1], [3, 0, 2, 1])
    flat = torch.zeros(1, 4)  # every pair tied in score: all wrong
    assert sort_train.pair_errors_by_digit(flat, values, 4) == ([3, 0, 2, 1], [3, 0, 2, 1])


def test_regroup_puts_every_item_in_that_many_sequences():
    pick = sort_train.regroup(12, 3, 4, torch.Generator().manual_seed(0))
    assert pick.shape == (16, 3)
    assert torch.equal(torch.bincount(pick.flatten(), minlength=12), torch.full((12,), 4))
    assert all(len(set(row.tolist())) == 3 for row in pick)  # no item twice in one sequence


def test_near_groups_are_runs_of_close_numbers():
    values = torch.randperm(60).float().view(12, 5) * 7  # 60 distinct numbers
    pick = sort_train.near_groups(values, 5, 3, torch.Generator().manual_seed(0))
    assert pick.shape == (36, 5)
    assert torch.equal(torch.bincount(pick.flatten(), minlength=60), torch.full((60,), 3))
    ranks = values.flatten().argsort().argsort()[pick]  # value ranks of each run's items
    steps = ranks.sort(-1).values.diff(dim=-1)
    wrapped = (steps != 1).any(-1)  # the one run per grouping that wraps around the order
    assert (steps[~wrapped] == 1).all() and wrapped.sum() <= 3
    assert (ranks.diff(dim=-1) > 0).all(-1).float().mean() < 0.2  # shuffled, not in order


def test_shift_moves_each_digit_within_the_bound():
    labels = torch.arange(10)
    images = torch.zeros(10, 1, 28, 28)
    images[:, 0, 14, 14] = 1.0  # one lit pixel at the centre of every digit
    seqs = MultiDigitSequences(images, labels, n=3, num_digits=2)
    x, values = seqs.sample(50, torch.Generator().manual_seed(0), shift=2)
    _, plain = seqs.sample(50, torch.Generator().manual_seed(0))
    assert torch.equal(values, plain)  # the same numbers, moved digits
    blocks = x.unflatten(-1, (2, 28)).transpose(-3, -2)  # (50, 3, 1, 2, 28, 28)
    lit = blocks.flatten(-2).argmax(-1)
    rows, cols = lit // 28, lit % 28
    assert (blocks.flatten(-2).sum(-1) == 1).all()  # the pixel is moved, not lost
    assert ((rows - 14).abs() <= 2).all() and ((cols - 14).abs() <= 2).all()
    assert len(set(zip(rows.flatten().tolist(), cols.flatten().tolist()))) > 10


def test_rotate_and_scale_change_the_digits_not_the_numbers():
    seqs = MultiDigitSequences(torch.rand(10, 1, 28, 28), torch.arange(10), n=3, num_digits=2)
    x, values = seqs.sample(4, torch.Generator().manual_seed(0), rotate=20, scale=0.1)
    plain, same = seqs.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(values, same) and x.shape == plain.shape
    assert not torch.allclose(x, plain, atol=1e-2)


def test_cnn_scores_each_image():
    net = SortCNN(num_digits=2)
    x = torch.rand(6, 1, 28, 56)
    assert net(x).shape == (6,)
    assert torch.allclose(net(x[2:3]), net(x)[2:3], atol=1e-5)


def blank_edged_tiles(count: int) -> torch.Tensor:
    tiles = torch.rand(count, 1, 28, 28, dtype=torch.float64)
    tiles[..., [0, 1, 26, 27]] = 0.0  # like most MNIST digits
    return tiles


@pytest.mark.parametrize("num_digits", [1, 2, 4])
def test_cnn_on_shared_tiles_is_the_cnn_on_the_numbers(num_digits):
    torch.manual_seed(0)
    net = SortCNN(num_digits).double()
    tiles = blank_edged_tiles(5)
    index = torch.randint(5, (7, num_digits))  # repeats within a number too
    numbers = tiles[index].permute(0, 2, 3, 1, 4).reshape(7, 1, 28, 28 * num_digits)
    shared, full = net(tiles, index), net(numbers)
    torch.testing.assert_close(shared, full, rtol=1e-12, atol=1e-12)
    weights = torch.randn(7, dtype=torch.float64)
    grads = [torch.autograd.grad(y @ weights, list(net.parameters())) for y in (shared, full)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="index must be"):
        net(tiles, index[:, :1] if num_digits > 1 else index.repeat(1, 2))


def test_ink_at_a_tile_edge_changes_the_shared_scores_a_little():
    torch.manual_seed(0)
    net = SortCNN(2).double()
    tiles, index = torch.rand(3, 1, 28, 28, dtype=torch.float64), torch.tensor([[0, 1], [2, 0]])
    numbers = tiles[index].permute(0, 2, 3, 1, 4).reshape(2, 1, 28, 56)
    shared, full = net(tiles, index), net(numbers)
    assert not torch.allclose(shared, full, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(shared, full, rtol=0.05, atol=0.05)


def test_shared_samples_use_each_tile_reuse_times():
    labels = torch.arange(10).repeat(3)
    images = torch.arange(30.0).view(30, 1, 1, 1).expand(30, 1, 28, 28)  # image i is all i
    seqs = MultiDigitSequences(images, labels, n=3, num_digits=2)
    tiles, index, values = seqs.sample_shared(8, 4, torch.Generator().manual_seed(0))
    assert tiles.shape == (8 * 3 * 2 // 4, 1, 28, 28) and index.shape == (8, 3, 2)
    assert (torch.bincount(index.flatten(), minlength=12) == 4).all()
    tile_labels = labels[tiles[:, 0, 0, 0].long()]
    assert torch.equal(values, (tile_labels[index] * torch.tensor([10, 1])).sum(-1).float())
    moved, _, same = seqs.sample_shared(8, 4, torch.Generator().manual_seed(0), shift=2)
    assert torch.equal(same, values) and not torch.equal(moved, tiles)
    with pytest.raises(ValueError, match="reuse must be >= 1 and divide"):
        seqs.sample_shared(8, 5)


def test_a_resumed_run_times_the_steps_of_every_epoch(tmp_path):
    out = tmp_path / "run"  # the summary reads every run folder beside it: only this one
    run_sort.main([*TINY, "--num_epochs", "1", "--out", str(out)])
    r = run_sort.main([*TINY, "--num_epochs", "2", "--out", str(out), "--resume"])
    rows = read_csv(out / "metrics.csv")
    per_epoch = [row["train_step_seconds"] for row in rows]
    assert len(per_epoch) == 2 and all(s > 0 for s in per_epoch)
    assert r["seconds_per_step"] == pytest.approx(sum(per_epoch) / 2)  # not the last epoch's


@pytest.mark.parametrize("sort", run_sort.SORTS)
def test_every_relaxation_trains_end_to_end(sort, tmp_path):
    out = tmp_path / sort
    r = run_sort.main([*TINY, "--sort", sort, "--num_epochs", "1", "--out", str(out)])
    assert 0.0 <= r["test_exact"] <= r["test_elementwise"] <= 1.0
    assert r["seconds_per_step"] > 0 and r["steps"] == 2
    assert sum(r["test_pairs_by_digit"]) <= 20 * 3  # at most 3 pairs per sequence of 3
    assert all(w <= p for w, p in zip(r["test_wrong_pairs_by_digit"], r["test_pairs_by_digit"]))
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
    ("flag", "value"),
    [
        ("near_groupings", 2),
        ("shift", 2),
        ("tied", 0.5),
        ("rotate", 10.0),
        ("scale", 0.1),
        ("weight_decay", 0.5),
    ],
)
def test_training_flags_change_training(flag, value, tmp_path):
    args = [*TINY, "--num_epochs", "1"]
    plain = run_sort.main([*args, "--out", str(tmp_path / "a")])
    other = run_sort.main([*args, f"--{flag}", str(value), "--out", str(tmp_path / "b")])
    loss = [(tmp_path / d / "metrics.csv").read_text().splitlines()[1] for d in "ab"]
    assert loss[0] != loss[1]
    assert other["config"][flag] == value and plain["config"][flag] == 0


def test_loss_floor_changes_the_loss_and_is_recorded(tmp_path):
    """Entries of P_hat below the floor cost log(1 / floor): at n = 3 from a fresh CNN (every
    entry near 1/3) a floor of 0.5 caps the loss at log 2."""
    args = [*TINY, "--num_epochs", "1"]
    plain = run_sort.main([*args, "--out", str(tmp_path / "a")])
    floored = run_sort.main([*args, "--loss_floor", "0.5", "--out", str(tmp_path / "b")])
    rows = [(tmp_path / d / "metrics.csv").read_text().splitlines()[1] for d in "ab"]
    losses = [float(r.split(",")[1]) for r in rows]
    assert losses[1] == pytest.approx(math.log(2), rel=1e-6) and losses[0] > losses[1]
    assert floored["config"]["loss_floor"] == 0.5 and plain["config"]["loss_floor"] == 1e-20


def test_digit_reuse_changes_training_and_is_recorded(tmp_path):
    args = [*TINY, "--num_epochs", "1", "--shift", "1"]
    plain = run_sort.main([*args, "--out", str(tmp_path / "a")])
    shared = run_sort.main([*args, "--digit_reuse", "4", "--out", str(tmp_path / "b")])
    loss = [(tmp_path / d / "metrics.csv").read_text().splitlines()[1] for d in "ab"]
    assert loss[0] != loss[1]
    assert shared["config"]["digit_reuse"] == 4 and plain["config"]["digit_reuse"] == 1
    assert 0.0 <= shared["test_exact"] <= shared["test_elementwise"] <= 1.0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--n", "1"], "--n must be >= 2"),
        (["--tau", "0"], "--tau must be > 0"),
        (["--groupings", "0"], "--groupings must be >= 1"),
        (["--near_groupings", "-1"], "--near_groupings must be >= 0"),
        (["--shift", "-1"], "--shift must be >= 0"),
        (["--tied", "1.5"], "--tied must be in [0, 1]"),
        (["--rotate", "-5"], "--rotate must be >= 0"),
        (["--scale", "1"], "--scale must be in [0, 1)"),
        (["--loss_floor", "0"], "--loss_floor must be in (0, 1)"),
        (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
        (["--digit_reuse", "5"], "--digit_reuse must divide batch_size * n * num_digits = 48"),
        (["--digit_reuse", "2", "--tied", "0.5"], "use --tied 0"),
        (["--sort", "bogosort"], "invalid choice"),
    ],
)
def test_cli_errors_are_one_line(args, needle, tmp_path):
    r = run_task("run_sort.py", *TINY, *args, "--out", str(tmp_path))
    assert_one_line_error(r, needle, tmp_path)


def test_summarize_tabulates_every_run_beside_it(tmp_path):
    def run(name, n, sort, exact, val, **flags):  # flags: e.g. near_groupings (absent: predates it)
        config = {"n": n, "sort": sort, "tau": 1.0, "lr": 1e-3, "groupings": 1} | flags
        result = {"config": config, "val_exact": val, "test_exact": exact}
        result |= {"test_elementwise": exact + 0.1, "seconds_per_step": 0.2, "steps": 500}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(result | {"minutes_to_best": 2}))

    run("b", 5, "sinkhorn", 0.4, 0.4)
    (tmp_path / "b" / "metrics.csv").write_text("epoch,val_exact,seconds\n1,0.3,60\n2,0.4,60\n")
    run("a", 3, "neuralsort", 0.7, 0.7)
    run("c", 3, "sinkhorn", 0.6, 0.5)
    # d: better on test than c, worse on validation
    run("d", 3, "sinkhorn", 0.65, 0.45, near_groupings=20, digit_reuse=4)
    run("e", 3, "neuralsort", 0.8, 0.6, seed=1, out="elsewhere")  # a's recipe, another seed
    run("f", 5, "sinkhorn", 0.5, 0.3, seed=1)  # b's recipe, another seed: mean validation .35
    # g: one seed, validation above b and f's mean; a recipe with two seeds heads the table
    run("g", 5, "sinkhorn", 0.9, 0.45, near_groupings=20)
    run_sort.summarize(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    rows = [r for r in text.split("\n\n")[0].splitlines() if r.startswith("| ")]
    assert len(rows) == 1 + 7  # header and one row per run
    table = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["n"], r["sort"]) for r in table][1:3] == [(3, "neuralsort"), (3, "sinkhorn")]
    assert "0.930 (0.951)" in rows[1]  # the paper's n = 3 figure beside it
    assert rows[1].startswith("| 3 | neuralsort | a | ")  # each run named by its folder
    assert "| groupings | near groupings | digit reuse |" in rows[0]
    assert "| 1 | 0 | 1 | 1e-20 | 0.700 |" in rows[1]  # runs before a flag read its default
    assert "| d | 1 | 0.001 | 1 | 20 | 4 | 1e-20 | 0.650 |" in rows[4]
    pivot = text.split("\n\n")[1].splitlines()
    assert pivot[0] == "| relaxation | n = 3 | n = 5 |"
    # each cell: the recipe best on mean validation (c's, not d's), its seeds averaged
    assert pivot[3] == "| sinkhorn | 0.600 (0.700), 1 seed | 0.450 (0.550), 2 seeds |"
    assert pivot[2] == "| neuralsort | 0.750 (0.850), 2 seeds | - |"
    # the paper's two NeuralSort rows under the pivot; a stochastic run is set beside its own
    assert pivot[-2:] == [
        "| paper (NeuralSort) | 0.930 (0.951) | 0.837 (0.927) |",
        "| paper (stochastic NeuralSort) | 0.927 (0.950) | 0.835 (0.926) |",
    ]
    assert sort_summary.paper_figure("neuralsort-stochastic", 9) == (0.646, 0.895)
    assert sort_summary.paper_figure("lp-birkhoff", 9) == (0.649, 0.896)
    assert sort_summary.paper_figure("neuralsort", 4) is None
    top = json.loads((tmp_path / "headline.json").read_text())
    assert [(h["n"], h["sort"], h["seeds"]) for h in top] == [
        (3, "neuralsort", 2),
        (3, "sinkhorn", 1),
        (5, "sinkhorn", 2),
    ]
    assert top[2]["runs"] == ["b", "f"]  # not g, better on validation with one seed
    assert top[0]["test_exact_per_seed"] == [0.7, 0.8] and top[0]["runs"] == ["a", "e"]
    assert "| 3 | neuralsort | 1 | 1e-20 | 2 | 0.750 (0.700, 0.800) | 0.850 |" in text
    assert (tmp_path / "accuracy_vs_n.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_minutes.png").stat().st_size > 0


def test_best_epoch_breaks_exact_ties_by_elementwise_accuracy(tmp_path, monkeypatch):
    # exact accuracy 0 at every epoch (as at n = 15 early on): the element-wise one decides
    accuracies = iter([(0.0, 0.30), (0.0, 0.45), (0.0, 0.40)])
    monkeypatch.setattr(sort_train, "sort_accuracy", lambda scores, values: next(accuracies))
    r = run_sort.main([*TINY, "--num_epochs", "2", "--out", str(tmp_path / "run")])
    assert r["best_epoch"] == 2 and r["val_exact"] == 0.0
    assert r["test_exact"] == 0.0 and r["test_elementwise"] == 0.40  # the third call: test


def test_step_benchmark_times_each_digit_reuse(tmp_path, capsys):
    from tasks import bench_sort_step

    out = tmp_path / "bench"
    args = ["--dataset", "mnist5k", "--n", "3", "--batch_size", "4", "--steps", "2"]
    rows = bench_sort_step.main([*args, "--reuse", "1", "2", "--threads", "1", "--out", str(out)])
    assert [r["digit_reuse"] for r in rows] == [1, 2]
    assert [r["digit_images_per_step"] for r in rows] == [48, 24]
    assert all(r["ms_per_step"] > 0 for r in rows)
    saved = json.loads((out / "bench_sort_step.json").read_text())
    assert saved["rows"] == rows and saved["config"]["steps"] == 2
    assert len((out / "bench_sort_step.csv").read_text().splitlines()) == 3
    assert (out / "bench_sort_step.png").stat().st_size > 0
    assert not list(out.glob("*/results.json"))  # the runs themselves stay in a temporary folder
    with pytest.raises(SystemExit):
        bench_sort_step.main([*args, "--reuse", "0", "--out", str(out)])
    assert "--reuse values must be >= 1" in capsys.readouterr().err
