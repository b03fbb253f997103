"""Learning to sort multi-digit MNIST numbers through a relaxed permutation: training and test."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from layers import get_sort
from tasks.common.bench import machine_info
from tasks.common.cli import write_json
from tasks.common.data import MultiDigitSequences, load_dataset
from tasks.common.models import SortCNN
from tasks.common.plots import read_csv
from tasks.common.training import Trainer, epoch_minutes, mean_step_seconds, seed_everything
from tasks.sort.summary import summarize


def true_permutation(values: torch.Tensor) -> torch.Tensor:
    """``(..., n) -> (..., n, n)``: row i is one-hot at the item of rank i (largest first)."""
    order = torch.argsort(values, dim=-1, descending=True, stable=True)
    return torch.nn.functional.one_hot(order, values.shape[-1]).to(values.dtype)


def regroup(count: int, n: int, groupings: int, generator: torch.Generator) -> torch.Tensor:
    """``(groupings * count / n, n)`` indices: ``groupings`` random partitions of ``count``
    items into sequences of ``n``, so that each item is in exactly ``groupings`` sequences."""
    return torch.rand(groupings, count, generator=generator).argsort(-1).reshape(-1, n)


def near_groups(
    values: torch.Tensor, n: int, groupings: int, generator: torch.Generator
) -> torch.Tensor:
    """``(groupings * count / n, n)`` indices into the ``count`` items of ``values``: each
    grouping cuts the items, in value order rotated by a random offset, into runs of ``n``
    consecutive ones (numbers close in value, so that their lower digits decide their order);
    the items of a run come in random order."""
    count = values.numel()
    order = values.flatten().argsort().cpu()
    offsets = torch.randint(count, (groupings, 1), generator=generator)
    runs = order[(offsets + torch.arange(count)) % count].reshape(-1, n)
    shuffle = torch.rand(runs.shape, generator=generator).argsort(-1)
    return runs.gather(-1, shuffle)


def pair_errors_by_digit(
    scores: torch.Tensor, values: torch.Tensor, num_digits: int
) -> tuple[list[int], list[int]]:
    """``(wrong, pairs)``, one count per digit position (leading digit first): the pairs of
    numbers in one sequence whose order that digit decides (their first differing digit), and
    how many of them the scores put in the wrong order (ties in score count as wrong)."""
    digits = values.long()[..., None] // 10 ** torch.arange(num_digits - 1, -1, -1) % 10
    larger = values[..., :, None] > values[..., None, :]  # (..., n, n): pairs i > j
    wrong = larger & (scores[..., :, None] <= scores[..., None, :])
    differ = digits[..., :, None, :] != digits[..., None, :, :]
    decider = differ.int().argmax(-1)  # the first differing digit
    return (
        [int((wrong & (decider == k)).sum()) for k in range(num_digits)],
        [int((larger & (decider == k)).sum()) for k in range(num_digits)],
    )


def sort_accuracy(scores: torch.Tensor, values: torch.Tensor) -> tuple[float, float]:
    """(exact, element-wise): sequences whose predicted order is entirely right, and items put
    in their right place."""
    pred = torch.argsort(scores, dim=-1, descending=True, stable=True)
    true = torch.argsort(values, dim=-1, descending=True, stable=True)
    right = pred == true
    return right.all(-1).float().mean().item(), right.float().mean().item()


def run(cfg) -> dict:
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=0)
    train = MultiDigitSequences(data.train_x, data.train_y, cfg.n, cfg.num_digits)
    val = MultiDigitSequences(data.val_x, data.val_y, cfg.n, cfg.num_digits).fixed(
        cfg.val_sequences, seed=1
    )
    test = MultiDigitSequences(data.test_x, data.test_y, cfg.n, cfg.num_digits).fixed(
        cfg.test_sequences, seed=2
    )
    seed_everything(cfg.seed)
    model = SortCNN(cfg.num_digits)
    extra = {"num_samples": cfg.num_samples} if cfg.sort == "neuralsort-stochastic" else {}
    relax = get_sort(cfg.sort, tau=cfg.tau, **extra)
    optimizer = torch.optim.Adam(  # decoupled (AdamW) decay; weight_decay 0 is plain Adam
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, decoupled_weight_decay=True
    )
    trainer = Trainer.from_flags(model, optimizer, cfg, monitor="val_select_acc")
    dev = trainer.device

    def scores_of(net, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[:2]
        return net(x.reshape(b * n, *x.shape[2:]).to(dev)).reshape(b, n)

    def train_step(net, gen):
        augment = {"shift": cfg.shift, "rotate": cfg.rotate, "scale": cfg.scale}
        if cfg.digit_reuse > 1:
            tiles, index, values = train.sample_shared(
                cfg.batch_size, cfg.digit_reuse, gen, **augment
            )
            scores = net(tiles.to(dev), index.flatten(0, 1).to(dev)).view(values.shape)
        else:
            x, values = train.sample(cfg.batch_size, gen, tied=cfg.tied, **augment)
            scores = scores_of(net, x)
        values = values.to(dev)
        if cfg.groupings > 1 or cfg.near_groupings:  # the same scores, in more sequences
            parts = [regroup(cfg.batch_size * cfg.n, cfg.n, cfg.groupings, gen)]
            if cfg.near_groupings:
                parts.append(near_groups(values, cfg.n, cfg.near_groupings, gen))
            if cfg.tied:  # the tied sequences, also sorted whole
                parts.insert(0, torch.arange(cfg.batch_size * cfg.n).view(-1, cfg.n))
            pick = torch.cat(parts).to(dev)
            scores, values = scores.flatten()[pick], values.flatten()[pick]
        p_true = true_permutation(values)
        p_hat = relax(scores)  # (..., b, n, n); stochastic: leading samples dim
        loss = -(p_true * torch.log(p_hat.clamp_min(cfg.loss_floor))).sum(-1).mean()
        loss.backward()
        return {"loss": loss.item()}

    def score_all(net, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([scores_of(net, x[i : i + 250]) for i in range(0, len(x), 250)]).cpu()

    def evaluate(net, split=val) -> dict[str, float]:
        exact, elementwise = sort_accuracy(score_all(net, split[0]), split[1])
        # selects the best epoch: exact accuracy, ties (e.g. all 0 at large n) broken by the
        # element-wise one, which adds less than one sequence's worth (1 / len) of exact
        select = exact + elementwise / (2 * len(split[1]))
        return {"val_exact": exact, "val_elementwise": elementwise, "val_select_acc": select}

    trainer.fit(cfg.num_epochs, cfg.steps_per_epoch, train_step, evaluate)
    if trainer.rank != 0:
        return {}
    best_epoch = trainer.load_best()
    rows = read_csv(trainer.metrics_path)
    model.eval()
    with torch.no_grad():
        test_scores = score_all(model, test[0])
    exact, elementwise = sort_accuracy(test_scores, test[1])
    wrong, pairs = pair_errors_by_digit(test_scores, test[1], cfg.num_digits)
    result = {
        "config": asdict(cfg),
        "best_epoch": best_epoch,
        "val_exact": next(float(r["val_exact"]) for r in rows if r["epoch"] == best_epoch),
        "test_exact": exact,
        "test_elementwise": elementwise,
        # pairs of test numbers whose order their k-th digit decides, and how many are wrong
        "test_pairs_by_digit": pairs,
        "test_wrong_pairs_by_digit": wrong,
        "seconds_per_step": mean_step_seconds(rows),
        "steps": best_epoch * cfg.steps_per_epoch,
        **epoch_minutes(rows, best_epoch),
        "machine": machine_info(cfg.device),
    }
    write_json(f"{cfg.out}/results.json", result)
    print(
        f"\nn={cfg.n} {cfg.sort}: test exact {result['test_exact']:.3f}, element-wise "
        f"{result['test_elementwise']:.3f} (best epoch {best_epoch}); "
        f"{1000 * result['seconds_per_step']:.0f} ms/step\n"
        "wrong test pairs, by the digit that decides their order: "
        + ", ".join(f"{w}/{p}" for w, p in zip(wrong, pairs))
    )
    summarize(Path(cfg.out).parent)
    return result
