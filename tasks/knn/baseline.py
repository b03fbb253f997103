"""The CNN baseline of the dKNN table: backbone, linear head, cross-entropy."""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F

from tasks.common.cli import write_json
from tasks.common.data import load_dataset, random_shift
from tasks.common.models import Classifier, embed, make_backbone
from tasks.common.training import Trainer, seed_everything


def run(cfg) -> dict:
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
