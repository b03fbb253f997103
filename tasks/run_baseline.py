"""The CNN baseline of the NeuralSort dKNN table: the same backbone with a linear head, trained
with cross-entropy and SGD (momentum 0.9, weight decay 5e-4).

    python tasks/run_baseline.py --dataset mnist --data-dir ../shared/data --nloglr 2

Writes config.json, metrics.csv, ckpt.pt, best.pt, curves.png and results.json to ``--out``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from tasks.cli import parse_config, run_main, write_json
from tasks.data import load_dataset, random_shift
from tasks.models import Classifier, embed, make_backbone
from tasks.training import ImageTaskFlags, Trainer, seed_everything


@dataclass
class BaselineConfig(ImageTaskFlags):
    """CNN baseline: backbone + linear head + cross-entropy."""

    nloglr: float = field(default=2.0, metadata={"help": "learning rate = 10**-nloglr"})
    batch_size: int = field(default=100, metadata={"help": "images per step"})
    num_epochs: int = field(default=10, metadata={"help": "epochs"})
    steps_per_epoch: int = field(
        default=0, metadata={"help": "steps per epoch (0: training size / batch_size)"}
    )

    def validate(self) -> None:
        super().validate()
        for name in ("batch_size", "num_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        self.out = self.out or f"results/baseline/{self.dataset}-lr{self.nloglr:g}"


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BaselineConfig, argv)
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=0)
    seed_everything(cfg.seed)
    model = Classifier(make_backbone(cfg.backbone, data.image_shape), data.num_classes)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=10.0**-cfg.nloglr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    trainer = Trainer.from_flags(model, optimizer, cfg)
    dev, n = trainer.device, len(data.train_y)

    def accuracy(m, x, y) -> float:
        return (embed(m, x, dev).argmax(1) == y.to(dev)).float().mean().item()

    def train_step(net, gen):
        idx = torch.randint(n, (cfg.batch_size,), generator=gen)
        logits = net(random_shift(data.train_x[idx], cfg.augment, gen).to(dev))
        loss = F.cross_entropy(logits, data.train_y[idx].to(dev))
        loss.backward()
        return {"loss": loss.item()}

    steps = cfg.steps_per_epoch or max(1, n // cfg.batch_size)
    best = trainer.fit(
        cfg.num_epochs,
        steps,
        train_step,
        lambda m: {"val_acc": accuracy(m, data.val_x, data.val_y)},
    )
    if trainer.rank != 0:
        return {}
    best_epoch = trainer.load_best()
    result = {
        "config": asdict(cfg),
        "data": data.summary(),
        "best_epoch": best_epoch,
        "val_acc": best["best_val"],
        "test_acc": accuracy(model, data.test_x, data.test_y),
    }
    write_json(f"{cfg.out}/results.json", result)
    print(
        f"\n{cfg.dataset} CNN baseline test accuracy (best epoch {best_epoch}): "
        f"{100 * result['test_acc']:.2f}%  ({cfg.out})"
    )
    return result


if __name__ == "__main__":
    run_main(main)
