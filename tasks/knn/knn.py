"""Classical kNN (pixels and PCA features), k and weighting chosen on validation."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from layers import knn_vote, nearest_neighbors
from tasks.common.cli import UserError, atomic_write_text, write_json
from tasks.common.data import load_dataset

WEIGHTINGS = ("uniform", "distance")


def pca_fit(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and top-``dim`` principal directions ``(d, dim)`` of the rows of ``x``."""
    mean = x.mean(0)
    xc = x - mean
    cov = (xc.T.double() @ xc.double()) / (x.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)
    return mean, vecs[:, -dim:].flip(1).to(x.dtype)


def evaluate(
    ref_x: torch.Tensor,
    ref_y: torch.Tensor,
    qx: torch.Tensor,
    qy: torch.Tensor,
    ks: list[int],
    num_classes: int,
    chunk_size: int,
    label: str,
) -> dict[tuple[int, str], float]:
    """Accuracy for every (k, weighting), from one neighbour search with k = max(ks)."""
    dist, idx = nearest_neighbors(qx, ref_x, max(ks), chunk_size=chunk_size, progress=label)
    labels = ref_y[idx]
    return {
        (k, w): (knn_vote(labels[:, :k], dist[:, :k], num_classes, w) == qy).float().mean().item()
        for k in ks
        for w in WEIGHTINGS
    }


def run(cfg) -> list[dict]:
    t0 = time.perf_counter()
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.seed)
    n_ref = len(data.train_y)
    if max(cfg.k) > n_ref:
        raise UserError(f"--k {max(cfg.k)} is larger than the {n_ref} training images")
    print(data.summary(), f"(loaded in {time.perf_counter() - t0:.1f}s)")
    dev = torch.device(cfg.device)
    flat = lambda x: x.reshape(len(x), -1).to(dev)  # noqa: E731
    tr_x, va_x, te_x = flat(data.train_x), flat(data.val_x), flat(data.test_x)
    tr_y, va_y, te_y = data.train_y.to(dev), data.val_y.to(dev), data.test_y.to(dev)
    full_x, full_y = torch.cat([tr_x, va_x]), torch.cat([tr_y, va_y])

    features = {"pixel": (tr_x, va_x, te_x, full_x)}
    if cfg.pca_dim:
        dim = min(cfg.pca_dim, tr_x.shape[1])
        mean, comps = pca_fit(tr_x, dim)
        proj = lambda x: (x - mean) @ comps  # noqa: E731
        features[f"pca{dim}"] = (proj(tr_x), proj(va_x), proj(te_x), proj(full_x))

    rows = []
    for feat, (ftr, fva, fte, ffull) in features.items():
        t1 = time.perf_counter()
        val = evaluate(ftr, tr_y, fva, va_y, cfg.k, data.num_classes, cfg.chunk_size, f"{feat} val")
        test = evaluate(
            ffull, full_y, fte, te_y, cfg.k, data.num_classes, cfg.chunk_size, f"{feat} test"
        )
        secs = time.perf_counter() - t1
        best = max(val, key=lambda kw: (val[kw], -kw[0]))
        for k, w in val:
            rows.append(
                {
                    "features": feat,
                    "k": k,
                    "weighting": w,
                    "val_acc": val[k, w],
                    "test_acc": test[k, w],
                    "selected": (k, w) == best,
                    "seconds": secs,
                }
            )
    total = time.perf_counter() - t0

    print(f"\n{'features':<8} {'k':>2} {'weighting':<9} {'val acc':>8} {'test acc':>8}")
    for r in rows:
        mark = "  <- selected on val" if r["selected"] else ""
        print(
            f"{r['features']:<8} {r['k']:>2} {r['weighting']:<9} {100 * r['val_acc']:>7.2f}% "
            f"{100 * r['test_acc']:>7.2f}%{mark}"
        )
    print(f"\ntotal time {total:.1f}s on {cfg.device} ({torch.get_num_threads()} threads)")

    header = "features,k,weighting,val_acc,test_acc,selected"
    lines = [header] + [
        f"{r['features']},{r['k']},{r['weighting']},{r['val_acc']:.6f},{r['test_acc']:.6f},{r['selected']}"
        for r in rows
    ]
    atomic_write_text(f"{cfg.out}/results.csv", "\n".join(lines) + "\n")
    write_json(
        f"{cfg.out}/results.json",
        {"config": asdict(cfg), "data": data.summary(), "seconds": total, "rows": rows},
    )
    print(f"wrote {cfg.out}/results.json and results.csv")
    return rows
