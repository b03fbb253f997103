"""The flags of tasks/run_sort.py, here so that the step benchmark can build a run too."""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.common.training import RunFlags

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
    loss_floor: float = field(
        default=1e-20,
        metadata={
            "help": "the loss is -sum P log(max(P_hat, this)): an entry of P_hat below it costs "
            "log(1/this) and passes no gradient (1e-20: the paper's cross-entropy, in effect)"
        },
    )
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
            "val_sequences",
            "test_sequences",
        )
        nonnegative = ("near_groupings", "shift", "rotate", "weight_decay")
        least = dict.fromkeys(counts, 1) | dict.fromkeys(nonnegative, 0)
        for name, low in least.items():
            if not getattr(self, name) >= low:  # not `<`: NaN fails this too
                raise ValueError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 < self.loss_floor < 1:
            raise ValueError(f"--loss_floor must be in (0, 1), got {self.loss_floor}")
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
