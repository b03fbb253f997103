"""Build the tutorial notebooks/04_tv_denoising.ipynb (cells only, no outputs).

    python notebooks/src/04_tv_denoising.py
    OMP_NUM_THREADS=1 python tasks/notebooks.py --save 04_tv_denoising.ipynb

The first command writes the notebook from the cells below; the second executes it and stores
the outputs.
"""

from __future__ import annotations

from _build import write

CELLS = [
    (
        "md",
        r"""
# 04 · Time-series denoising with total variation

Total-variation (TV) denoising recovers a piecewise-constant signal $x$ from a noisy $y$:

$$x^\star(y; D, \lambda) = \arg\min_x \ \tfrac12 \|x - y\|^2 + \lambda \|Dx\|_1,$$

where $D$ is the first-difference matrix, $(Dx)_i = x_i - x_{i+1}$, so the penalty counts (and
weighs) the jumps. It is OptNet's denoising experiment: $x^\star$ is a QP, so it can be a layer
whose $D$ and $\lambda$ are learned. Its dual is the box-constrained QP
$\min_z \tfrac12\|y - D^\top z\|^2$ s.t. $|z_i| \le \lambda$, with $x = y - D^\top z$; the
default `native` backend of `layers.tv` solves that dual for a whole batch with an interior
point and differentiates the solution in closed form on its active set.
""",
    ),
    (
        "code",
        """
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from layers import TVDenoise, difference_matrix, tv_denoise, tv_denoise_2d
from tasks.common.data import make_denoising_data

_ = torch.manual_seed(0)
print(difference_matrix(5))
""",
    ),
    (
        "md",
        r"""
## The data

OptNet's generator (`tasks.common.data.make_denoising_data`): signals of length 100 with 1 to 9 constant
segments at integer heights 10 to 99, plus Gaussian noise with $\sigma = 10$, so the noisy input
has a mean squared error of about 100. The paper uses 9,000 training and 1,000 test signals; here
300 and 100 keep the notebook fast. One example, denoised with a first guess $\lambda = 10$:
""",
    ),
    (
        "code",
        """
noisy, clean = make_denoising_data(400, seed=0)
train_y, train_x, test_y, test_x = noisy[:300], clean[:300], noisy[300:], clean[300:]
n = noisy.shape[1]
D = difference_matrix(n)


def mse(a, b):
    return (a - b).pow(2).mean().item()


print(
    f"signals {tuple(noisy.shape)}; noisy-input MSE: train {mse(train_y, train_x):.2f}, "
    f"test {mse(test_y, test_x):.2f}"
)

i = 0
x_hat, info = tv_denoise(test_y[i], D, 10.0, return_info=True)
print(
    f"{info.iterations} interior-point iterations, {info.polish_rounds} polish rounds, "
    f"certified RMS error bound {info.max_error_bound:.1e}"
)

plt.figure(figsize=(6, 3))
plt.plot(test_y[i], ".", color="0.6", ms=4, label="noisy $y$")
plt.plot(test_x[i], "k", lw=2, label="clean")
plt.plot(x_hat, "C3", label="TV, $\\\\lambda = 10$")
plt.xlabel("t")
plt.legend(fontsize=8)
plt.grid(alpha=0.3)
plt.show()
""",
    ),
    (
        "md",
        r"""
The certified bound comes from the dual: every solve returns a dual point $z$ with
$|z_i| \le \lambda$, and the duality gap bounds $\|x - x^\star\|$; the layer raises
`SolverError` when the bound is not small.

## Choosing $\lambda$

Classical TV has one knob. A small grid, scored by the training MSE, each point one batched
solve of all 300 training signals:
""",
    ),
    (
        "code",
        """
lams = [8.0, 12.0, 16.0, 20.0, 24.0, 28.0, 32.0]
t0 = time.perf_counter()
train_mse = [mse(tv_denoise(train_y, D, lam), train_x) for lam in lams]
best_lam = lams[min(range(len(lams)), key=train_mse.__getitem__)]
tv_test = mse(tv_denoise(test_y, D, best_lam), test_x)
print(f"grid of {len(lams)} in {time.perf_counter() - t0:.1f}s; best lambda {best_lam:g}")
print(f"test MSE: noisy input {mse(test_y, test_x):.2f}, TV {tv_test:.2f}")

plt.figure(figsize=(5, 3))
plt.plot(lams, train_mse, "o-")
plt.xlabel("$\\\\lambda$")
plt.ylabel("train MSE")
plt.grid(alpha=0.3)
plt.show()
""",
    ),
    (
        "md",
        r"""
Tuned TV cuts the error about sixfold. (The library's full run, tuned on 9,000 signals, found
$\lambda = 21.07$ and a test MSE of 15.90; OptNet's paper reports 16.5.)

## Learning $D$ and $\lambda$

`TVDenoise(n, D="diff", lam=...)` is the same solve as an `nn.Module`, with $D$ and $\log\lambda$
as parameters (`learn_D`, `learn_lam`). We start from the tuned TV, so training begins exactly at
the baseline, and train with Adam on the MSE: batches of 30, learning rates as in
`tasks/run_denoise.py` ($10^{-4}$ for $D$, $10^{-3}$ for $\log\lambda$). $D$ is sensitive: with
$10^{-3}$ for $D$ the training MSE rose to about 20 after one epoch in our runs.
""",
    ),
    (
        "code",
        """
torch.manual_seed(0)
model = TVDenoise(n, "diff", best_lam)
D_init = model.D.detach().clone()
groups = [{"params": [model.D], "lr": 1e-4}, {"params": [model.log_lam], "lr": 1e-3}]
opt = torch.optim.Adam(groups)


def evaluate():
    with torch.no_grad():
        return mse(model(train_y), train_x), mse(model(test_y), test_x)


tr, te = evaluate()
print(f"epoch 0: train {tr:.3f}  test {te:.3f}  lambda {model.lam.item():.2f}")
t0 = time.perf_counter()
for epoch in range(1, 6):
    for idx in torch.randperm(len(train_y)).split(30):
        loss = (model(train_y[idx]) - train_x[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tr, te = evaluate()
    print(f"epoch {epoch}: train {tr:.3f}  test {te:.3f}  lambda {model.lam.item():.2f}")
print(f"{time.perf_counter() - t0:.1f}s; tuned TV test MSE {tv_test:.3f}")
""",
    ),
    (
        "code",
        """
D_learned = model.D.detach()
change = D_learned - D_init
fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
for ax, M, title in [(axes[0], D_init, "initial D"), (axes[1], D_learned, "learned D")]:
    im = ax.imshow(M, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_title(title, fontsize=9)
lim = change.abs().max().item()
im = axes[2].imshow(change, cmap="RdBu_r", vmin=-lim, vmax=lim)
axes[2].set_title(f"learned - initial (max {lim:.1e})", fontsize=9)
fig.colorbar(im, ax=axes[2], fraction=0.046)
for ax in axes:
    ax.set_xlabel("column")
axes[0].set_ylabel("row")
fig.tight_layout()
plt.show()
""",
    ),
    (
        "md",
        r"""
Learning $D$ and $\lambda$ alone barely moves the error: the training MSE falls by under 1%, the
test MSE ends no better than tuned TV's, and the learned $D$ differs from the difference matrix by
about $10^{-3}$ (spread over all entries, not only the band). The library's full runs (`results/denoise`, 9,000 signals) show
the same: $D$ and $\lambda$ only, 10 epochs: test MSE 15.91 against 15.90 for tuned TV. The gain
to 14.4 that OptNet reports came, in the library's measurements, from learned input and output
maps around the TV layer, $x = (I + P)\, \mathrm{TV}_{D,\lambda}((I + W) y + c)$
(`MappedTV` in `tasks/run_denoise.py`: test MSE 14.41 after 40 epochs).

## Images: 2-D total variation

`tv_denoise_2d` applies anisotropic TV to images: $D$ stacks the horizontal and vertical
differences of the pixel grid (`grid_difference_matrix`). A digit from scikit-learn's 8×8 set,
upscaled to 28×28 (nearest neighbour, so it is piecewise constant), with noise $\sigma = 0.3$. One
batched call denoises it with three values of $\lambda$ (a $\lambda$ per batch element):
""",
    ),
    (
        "code",
        """
digit = torch.tensor(load_digits().images[0], dtype=torch.float32) / 16
image = F.interpolate(digit[None, None], size=(28, 28), mode="nearest")[0, 0]
noisy_image = image + 0.3 * torch.randn(28, 28)

lams_2d = torch.tensor([0.05, 0.2, 0.6])
t0 = time.perf_counter()
denoised = tv_denoise_2d(noisy_image.expand(3, 28, 28), lams_2d)
print(f"3 images of 28x28 in {time.perf_counter() - t0:.1f}s")

panels = [(image, "clean"), (noisy_image, f"noisy, MSE {mse(noisy_image, image):.3f}")]
panels += [
    (x, f"$\\\\lambda$ = {lam:g}, MSE {mse(x, image):.3f}") for x, lam in zip(denoised, lams_2d)
]
fig, axes = plt.subplots(1, 5, figsize=(9, 2.2))
for ax, (img, title) in zip(axes, panels):
    ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
fig.tight_layout()
plt.show()
""",
    ),
    (
        "md",
        r"""
Too small a $\lambda$ leaves the noise, too large a one merges the strokes into flat blobs. For
the full 1-D experiment (FC net, tuned TV, OptNet-tuned TV with input/output maps, pure OptNet
with a random $D$) see `tasks/run_denoise.py`; `tasks/bench_tv.py` compares the TV backends.
""",
    ),
]


if __name__ == "__main__":
    write(CELLS, "04_tv_denoising.ipynb")
