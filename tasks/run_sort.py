"""Learning to sort images of numbers (NeuralSort paper, Table 1, large-MNIST).

Each item is a ``--num_digits``-digit number drawn as MNIST digits side by side (28 x 112); a CNN
scores every item and is trained, through a relaxed permutation matrix, to sort ``--n`` of them by
their (unseen) values. Loss: cross-entropy between the true permutation matrix and the relaxed
one. Reported: the proportion of sequences sorted exactly, and of items put in the right place.

    python tasks/run_sort.py --n 5 --sort neuralsort --data-dir ../shared/data

The CNN is the whole cost of a step (the relaxations take about 1 % of it), so ``--groupings K``
scores the step's ``batch_size * n`` numbers once and sorts them in ``K`` random partitions into
sequences of ``n``: every image then takes part in ``K`` sequences (more comparisons per CNN
pass) at K times the relaxation's cost. ``--groupings 1`` is the paper's sampling.
``--near_groupings J`` adds J groupings of numbers close in value (runs of n in value order), in
which the lower digits decide the order; the CNN otherwise learns them last (uniform numbers mostly
differ in their first digit).
``--digit_reuse R`` builds the step's numbers from R times fewer digit images, each image in R
numbers, and the CNN convolves each image once (``SortCNN(tiles, index)``, the same function
while the digits' outer columns are blank): cheaper steps that see fewer distinct digits.

``--shift``, ``--rotate`` and ``--scale`` move, rotate and zoom every training digit at random
(augmentation: at batch 10 and 3,000 steps an epoch, each training digit is seen ~11 times an
epoch, and the CNN otherwise overfits them).

Writes config.json, metrics.csv, ckpt.pt, best.pt, curves.png and results.json to ``--out``, then
refreshes the comparison over every finished run beside it (summary.md, summary.json,
accuracy_vs_n.png in the parent folder).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from layers.sort import get_sort
from tasks.cli import atomic_write_text, parse_config, run_main, write_json
from tasks.data import MultiDigitSequences, load_dataset
from tasks.models import SortCNN
from tasks.plots import read_csv
from tasks.training import RunFlags, Trainer, seed_everything

SORTS = ["neuralsort", "neuralsort-stochastic", "lp-permutahedron", "lp-birkhoff", "sinkhorn"]


@dataclass
class SortConfig(RunFlags):
    """Train a CNN to sort multi-digit MNIST numbers through a relaxed permutation."""

    n: int = field(default=5, metadata={"help": "numbers per sequence"})
    sort: str = field(default="neuralsort", metadata={"choices": SORTS, "help": "relaxation"})
    tau: float = field(default=1.0, metadata={"help": "temperature / regularization strength"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "decoupled weight decay (AdamW) per unit of learning rate (0: Adam)"},
    )
    batch_size: int = field(default=20, metadata={"help": "sequences per step (M)"})
    groupings: int = field(
        default=1,
        metadata={
            "help": "score the step's batch_size*n numbers once, then sort them in this many "
            "random groupings into sequences of n (1: each number in one sequence, the paper)"
        },
    )
    near_groupings: int = field(
        default=0,
        metadata={
            "help": "add this many groupings of numbers close in value (runs of n in value "
            "order), where the lower digits decide the order (0: none)"
        },
    )
    tied: float = field(
        default=0.0,
        metadata={
            "help": "share of training sequences whose numbers share their first digits (a "
            "curriculum for the lower digits; 0: the paper's uniform numbers)"
        },
    )
    digit_reuse: int = field(
        default=1,
        metadata={
            "help": "build a step's numbers from 1/this as many digit images, each image in "
            "this many numbers; the CNN convolves each image once (faster steps, same CNN; "
            "1: every digit its own image, the paper)"
        },
    )
    shift: int = field(
        default=0, metadata={"help": "move each training digit by up to this many pixels"}
    )
    rotate: float = field(
        default=0.0, metadata={"help": "rotate each training digit by up to this many degrees"}
    )
    scale: float = field(
        default=0.0,
        metadata={"help": "zoom each training digit by a factor in [1 - scale, 1 + scale]"},
    )
    num_samples: int = field(default=5, metadata={"help": "samples (neuralsort-stochastic)"})
    num_epochs: int = field(default=10, metadata={"help": "epochs"})
    steps_per_epoch: int = field(default=500, metadata={"help": "steps per epoch"})
    num_digits: int = field(default=4, metadata={"help": "digits per number"})
    dataset: str = field(
        default="mnist", metadata={"choices": ["mnist", "mnist5k"], "help": "digit images"}
    )
    data_dir: str = field(default="data", metadata={"help": "torchvision data folder"})
    download: bool = field(default=False, metadata={"help": "download MNIST if missing"})
    val_sequences: int = field(default=500, metadata={"help": "validation sequences"})
    test_sequences: int = field(default=2000, metadata={"help": "test sequences"})

    def validate(self) -> None:
        if self.n < 2:
            raise ValueError(f"--n must be >= 2, got {self.n}")
        if not self.tau > 0:
            raise ValueError(f"--tau must be > 0, got {self.tau}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        counts = (
            "batch_size",
            "groupings",
            "num_samples",
            "num_epochs",
            "steps_per_epoch",
            "num_digits",
            "digit_reuse",
        )
        nonnegative = ("near_groupings", "shift", "rotate", "weight_decay")
        least = dict.fromkeys(counts, 1) | dict.fromkeys(nonnegative, 0)
        for name, low in least.items():
            if not getattr(self, name) >= low:  # not `<`: NaN fails this too
                raise ValueError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.scale < 1:
            raise ValueError(f"--scale must be in [0, 1), got {self.scale}")
        if not 0 <= self.tied <= 1:
            raise ValueError(f"--tied must be in [0, 1], got {self.tied}")
        slots = self.batch_size * self.n * self.num_digits
        if slots % self.digit_reuse:
            raise ValueError(
                f"--digit_reuse must divide batch_size * n * num_digits = {slots}, "
                f"got {self.digit_reuse}"
            )
        if self.digit_reuse > 1 and self.tied:
            raise ValueError("--digit_reuse > 1 draws uniform numbers only; use --tied 0")
        self.out = self.out or f"results/sort/n{self.n}-{self.sort}-t{self.tau:g}"


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


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(SortConfig, argv)
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
    step_times: list[float] = []

    def scores_of(net, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[:2]
        return net(x.reshape(b * n, *x.shape[2:]).to(dev)).reshape(b, n)

    def train_step(net, gen):
        t0 = time.perf_counter()
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
        loss = -(p_true * torch.log(p_hat.clamp_min(1e-20))).sum(-1).mean()
        loss.backward()
        step_times.append(time.perf_counter() - t0)
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
    seconds = [float(row["seconds"]) for row in rows]
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
        "seconds_per_step": sum(step_times) / max(1, len(step_times)),
        "steps": best_epoch * cfg.steps_per_epoch,
        "minutes_to_best": sum(seconds[:best_epoch]) / 60,  # training and validation
        "minutes": sum(seconds) / 60,
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


PAPER = {
    3: (0.930, 0.951),
    5: (0.837, 0.927),
    7: (0.738, 0.909),
    9: (0.649, 0.896),
    15: (0.386, 0.857),
}  # NeuralSort Table 1, deterministic NeuralSort: exact (element-wise)


def _best_on_validation(runs: list[dict]) -> dict[tuple[str, int], dict]:
    """``(relaxation, n) -> run``: of several runs of one relaxation at one n, the one with the
    best validation exact accuracy (the first on ties)."""
    best: dict[tuple[str, int], dict] = {}
    for r in runs:
        key = (r["sort"], r["n"])
        if key not in best or r["val_exact"] > best[key]["val_exact"]:
            best[key] = r
    return best


def _by_relaxation_and_n(runs: list[dict]) -> list[str]:
    """Markdown rows: one per relaxation, one column per n; each cell the test exact
    (element-wise) accuracy and ms per step of the run best on validation."""
    ns = sorted({r["n"] for r in runs})
    best = _best_on_validation(runs)
    lines = [
        "| relaxation | " + " | ".join(f"n = {n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for name in sorted({r["sort"] for r in runs}):
        cells = [
            f"{r['test_exact']:.3f} ({r['test_elementwise']:.3f}), {r['ms_per_step']:.0f} ms"
            if (r := best.get((name, n)))
            else "-"
            for n in ns
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    paper = [f"{PAPER[n][0]:.3f} ({PAPER[n][1]:.3f})" if n in PAPER else "-" for n in ns]
    lines.append("| paper (NeuralSort) | " + " | ".join(paper) + " |")
    return lines


def summarize(root: str | Path) -> None:
    """Collect every ``*/results.json`` under ``root`` into summary.md / .json and a plot."""
    root = Path(root)
    runs = []
    for f in sorted(root.glob("*/results.json")):
        r = json.loads(f.read_text())
        c = r["config"]
        runs.append(
            {
                "run": f.parent.name,
                "n": c["n"],
                "sort": c["sort"],
                "tau": c["tau"],
                "lr": c["lr"],
                "groupings": c.get("groupings", 1),
                "near_groupings": c.get("near_groupings", 0),
                "digit_reuse": c.get("digit_reuse", 1),
                "val_exact": r.get("val_exact", 0.0),
                "test_exact": r["test_exact"],
                "test_elementwise": r["test_elementwise"],
                "ms_per_step": 1000 * r["seconds_per_step"],
                "steps": r.get("steps"),
                "minutes_to_best": r.get("minutes_to_best"),
            }
        )
    if not runs:
        return
    runs.sort(key=lambda r: (r["n"], r["sort"]))
    lines = [
        "| n | relaxation | run | tau | lr | groupings | near groupings | digit reuse | "
        "test exact | test element-wise | paper (NeuralSort) | ms/step | steps | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        paper = PAPER.get(r["n"])
        ptxt = f"{paper[0]:.3f} ({paper[1]:.3f})" if paper else "-"
        minutes = "-" if r["minutes_to_best"] is None else f"{r['minutes_to_best']:.0f}"
        lines.append(
            f"| {r['n']} | {r['sort']} | {r['run']} | {r['tau']:g} | {r['lr']:g} | "
            f"{r['groupings']} | {r['near_groupings']} | {r['digit_reuse']} | "
            f"{r['test_exact']:.3f} | {r['test_elementwise']:.3f} | {ptxt} | "
            f"{r['ms_per_step']:.0f} | {r['steps']} | {minutes} |"
        )
    lines += ["", *_by_relaxation_and_n(runs)]
    atomic_write_text(root / "summary.md", "\n".join(lines) + "\n")
    write_json(root / "summary.json", runs)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best_on_validation(runs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, paper_col, title in (
        (axes[0], "test_exact", 0, "whole sequence sorted (exact)"),
        (axes[1], "test_elementwise", 1, "numbers in their place (element-wise)"),
    ):
        for name in sorted({r["sort"] for r in runs}):
            points = sorted((n, r[key]) for (sort, n), r in best.items() if sort == name)
            ax.plot(*zip(*points), marker="o", label=name)
        ax.plot(list(PAPER), [v[paper_col] for v in PAPER.values()], "k--", label="paper")
        ax.set_xlabel("n (numbers per sequence)")
        ax.set_ylabel("test accuracy")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_n.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
