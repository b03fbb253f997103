"""Differentiable kNN training: an embedding learned through a relaxed top-k, tested by hard kNN."""

from __future__ import annotations

from dataclasses import asdict

import torch

from layers import DKNN, knn_vote, nearest_neighbors
from tasks.common.bench import machine_info
from tasks.common.cli import UserError, write_json
from tasks.common.data import load_dataset, random_shift
from tasks.common.models import embed, make_backbone
from tasks.common.plots import read_csv
from tasks.common.training import Trainer, epoch_minutes, mean_step_seconds, seed_everything

SORTS = ["neuralsort", "lp-topk", "sinkhorn"]


def knn_accuracy(model, ref_x, ref_y, qx, qy, k, num_classes, device) -> float:
    """Hard kNN accuracy of queries ``qx`` against reference ``ref_x`` in ``model``'s embedding."""
    ref_e, q_e = embed(model, ref_x, device), embed(model, qx, device)
    dist, idx = nearest_neighbors(q_e, ref_e, k, chunk_size=1000)
    pred = knn_vote(ref_y.to(device)[idx], dist, num_classes)
    return (pred == qy.to(device)).float().mean().item()


def run(cfg) -> dict:
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=0)
    n_train = len(data.train_y)
    if cfg.num_train_queries + cfg.num_train_neighbors > n_train:
        raise UserError(
            f"--num_train_queries + --num_train_neighbors exceed the {n_train} training images"
        )
    seed_everything(cfg.seed)
    model = make_backbone(cfg.backbone, data.image_shape)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=10.0**-cfg.nloglr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    sort_kwargs = {"num_samples": cfg.num_samples} if cfg.method == "stochastic" else {}
    sort_name = "neuralsort-stochastic" if cfg.method == "stochastic" else cfg.sort
    dknn = DKNN(cfg.k, sort_name, tau=cfg.tau, **sort_kwargs)
    trainer = Trainer.from_flags(model, optimizer, cfg)
    dev = trainer.device
    acc = lambda m, qx, qy: knn_accuracy(  # noqa: E731
        m, data.train_x, data.train_y, qx, qy, cfg.k, data.num_classes, dev
    )
    if trainer.rank == 0:
        print(data.summary())
    init_test = (
        acc(model, data.test_x, data.test_y)
        if trainer.rank == 0 and not cfg.resume and cfg.baselines
        else None
    )
    q, nb = cfg.num_train_queries, cfg.num_train_neighbors

    def train_step(net, gen):
        idx = torch.randperm(n_train, generator=gen)[: q + nb]
        x, y = data.train_x[idx], data.train_y[idx].to(dev)
        # one forward for queries and candidates (one DDP pass)
        e = net(random_shift(x, cfg.augment, gen).to(dev))
        loss = dknn.loss(e[:q], e[q:], y[:q], y[q:])
        loss.backward()
        return {"loss": loss.item(), "topk_correct": -loss.item() / cfg.k}

    steps = cfg.steps_per_epoch or max(1, n_train // q)
    best = trainer.fit(
        cfg.num_epochs, steps, train_step, lambda m: {"val_acc": acc(m, data.val_x, data.val_y)}
    )
    if trainer.rank != 0:
        return {}
    best_epoch = trainer.load_best()
    rows = read_csv(trainer.metrics_path)
    test_acc = acc(model, data.test_x, data.test_y)
    pixel = None
    if cfg.baselines:
        dist, idx = nearest_neighbors(
            data.test_x.flatten(1).to(dev), data.train_x.flatten(1).to(dev), cfg.k, chunk_size=1000
        )
        hits = knn_vote(data.train_y.to(dev)[idx], dist, data.num_classes) == data.test_y.to(dev)
        pixel = hits.float().mean().item()
    result = {
        "config": asdict(cfg),
        "data": data.summary(),
        "best_epoch": best_epoch,
        "val_acc": best["best_val"],
        "test_acc": test_acc,
        "pixel_knn_test_acc": pixel,
        "init_embedding_test_acc": init_test,
        "seconds_per_step": mean_step_seconds(rows),
        "steps": best_epoch * steps,
        **epoch_minutes(rows, best_epoch),
        "machine": machine_info(cfg.device),
    }
    write_json(f"{cfg.out}/results.json", result)
    print(
        f"\n{cfg.dataset} test accuracy, hard {cfg.k}-NN against the training split:\n"
        f"  dKNN ({sort_name}, best epoch {best_epoch}): {100 * test_acc:.2f}%\n"
        + (f"  pixel kNN:                       {100 * pixel:.2f}%\n" if pixel is not None else "")
        + (f"  untrained embedding:             {100 * init_test:.2f}%\n" if init_test else "")
        + f"  {1000 * result['seconds_per_step']:.1f} ms per training step; results in {cfg.out}"
    )
    return result
