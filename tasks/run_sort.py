"""Learning to sort images of numbers (NeuralSort paper, Table 1, large-MNIST).

Each item is a ``--num_digits``-digit number drawn as MNIST digits side by side (28 x 112); a CNN
scores every item and is trained, through a relaxed permutation matrix, to sort ``--n`` of them by
their (unseen) values. Loss: cross-entropy between the true permutation matrix and the relaxed
one. Reported: the proportion of sequences sorted exactly, and of items put in the right place.

    python tasks/run_sort.py --n 5 --sort neuralsort --data-dir ../shared/data

The CNN is most of the cost of a step, so ``--groupings K``
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

from tasks.common.cli import parse_config, run_main
from tasks.sort.config import SORTS, SortConfig  # noqa: F401  (the flags: tasks/sort/config.py)
from tasks.sort.summary import summarize  # noqa: F401  (tests import it from here)
from tasks.sort.train import run


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(SortConfig, argv))


if __name__ == "__main__":
    run_main(main)
