"""tasks/common/data.py: embedded sets, real MNIST, and the on-disk formats written here and read
back."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tasks.common.data import (
    DATASETS,
    DatasetNotFoundError,
    load_dataset,
    random_affine,
    random_shift,
    read_idx,
    write_idx,
)


def _check_splits(d, n_classes=10):
    for x, y in [(d.train_x, d.train_y), (d.val_x, d.val_y), (d.test_x, d.test_y)]:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.dim() == 4 and len(x) == len(y) > 0
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert 0 <= y.min() and y.max() < n_classes
    assert d.num_classes == n_classes


@pytest.mark.parametrize(
    ("name", "sizes", "shape"),
    [
        ("digits", (1257, 180, 360), (1, 8, 8)),
        ("mnist5k", (3500, 500, 1000), (1, 28, 28)),
    ],
)
def test_embedded_sets(name, sizes, shape):
    d = load_dataset(name)
    _check_splits(d)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == sizes
    assert d.image_shape == shape
    # the split is a partition of the whole set: no image in two splits
    flat = torch.cat([d.train_x, d.val_x, d.test_x]).flatten(1)
    assert torch.unique(flat, dim=0).shape[0] >= 0.98 * flat.shape[0]  # (a few true duplicates)


def test_split_is_seeded_and_fixed():
    a, b, c = load_dataset("digits"), load_dataset("digits"), load_dataset("digits", seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.test_x, c.test_x)


def test_real_mnist(shared_data):
    d = load_dataset("mnist", shared_data)
    _check_splits(d)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (55000, 5000, 10000)
    # all ten digits, roughly balanced; the official test set's first label is a 7
    assert torch.bincount(d.test_y).min() > 800
    assert d.test_y[0].item() == 7


def _write_idx_set(folder, prefix, n_train, n_test, rng):
    folder.mkdir(parents=True)
    imgs = {}
    for split, n in [("train", n_train), ("t10k", n_test)]:
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}{split}-images-idx3-ubyte", x)
        write_idx(folder / f"{prefix}{split}-labels-idx1-ubyte", y)
        imgs[split] = (x, y)
    return imgs


@pytest.mark.parametrize(
    ("name", "folder", "prefix"),
    [
        ("fashion-mnist", "FashionMNIST/raw", ""),
        ("emnist-mnist", "EMNIST/raw", "emnist-mnist-"),
        ("emnist-digits", "EMNIST/raw", "emnist-digits-"),
    ],
)
def test_idx_sets_from_disk(tmp_path, name, folder, prefix):
    rng = np.random.default_rng(0)
    written = _write_idx_set(tmp_path / folder, prefix, n_train=50, n_test=20, rng=rng)
    d = load_dataset(name, tmp_path)
    _check_splits(d)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (45, 5, 20)
    x_test, y_test = written["t10k"]
    expect = x_test.transpose(0, 2, 1) if name.startswith("emnist") else x_test
    assert torch.equal(d.test_x[:, 0], torch.from_numpy(expect.astype(np.float32) / 255))
    assert torch.equal(d.test_y, torch.from_numpy(y_test.astype(np.int64)))


def test_idx_roundtrip_and_truncation(tmp_path):
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", x)
    assert np.array_equal(read_idx(tmp_path / "a"), x)
    (tmp_path / "b").write_bytes((tmp_path / "a").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "b")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_disk(tmp_path, name):
    rng = np.random.default_rng(1)
    folder = tmp_path / DATASETS[name].folder
    folder.mkdir(parents=True)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    n_classes = DATASETS[name].num_classes
    test_data = None
    for f in DATASETS[name].files:
        n = 10 if name == "cifar10" or f == "test" else 50
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {b"data": data, key: rng.integers(0, n_classes, size=n).tolist()}
        with open(folder / f, "wb") as fh:
            pickle.dump(batch, fh)
        test_data = batch if "test" in f else test_data
    d = load_dataset(name, tmp_path)
    _check_splits(d, n_classes)
    assert d.image_shape == (3, 32, 32)
    assert (len(d.train_y), len(d.val_y)) == (45, 5)
    expect = torch.from_numpy(test_data[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    assert torch.equal(d.test_x, expect)


def test_missing_dataset_names_files_and_flag(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert "data_batch_1" in msg and "--download" in msg and str(tmp_path) in msg


def test_unknown_dataset():
    with pytest.raises(ValueError, match="choose one of"):
        load_dataset("imagenet")


def test_random_shift_translates_each_image_and_is_seeded():
    x = torch.rand(16, 2, 6, 7)
    a = random_shift(x, 2, torch.Generator().manual_seed(3))
    b = random_shift(x, 2, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # every output is one window of the zero-padded image
        windows = [padded[i, :, r : r + 6, c : c + 7] for r in range(5) for c in range(5)]
        assert any(torch.equal(a[i], w) for w in windows)
    assert not torch.equal(a, x)  # 16 images: some offset is non-zero
    assert random_shift(x, 0) is x


def test_random_affine_is_seeded_and_identity_at_zero():
    x = torch.rand(8, 1, 28, 28)
    assert torch.allclose(random_affine(x, 0, 0, 0), x, atol=1e-5)
    a = random_affine(x, 15, 0.1, 2, torch.Generator().manual_seed(4))
    b = random_affine(x, 15, 0.1, 2, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.allclose(a, x, atol=1e-2)


def test_random_affine_keeps_each_digit_within_its_bounds():
    x = torch.zeros(64, 1, 28, 28, dtype=torch.float64)
    x[:, 0, 12:16, 12:16] = 1.0  # a square at the centre: only the shift moves its centre
    y = random_affine(x, 30, 0.2, 2, torch.Generator().manual_seed(0))
    grid = torch.arange(28, dtype=torch.float64)
    mass = y.sum((1, 2, 3))
    rows = (y.sum(3).squeeze(1) * grid).sum(-1) / mass
    cols = (y.sum(2).squeeze(1) * grid).sum(-1) / mass
    assert ((rows - 13.5).abs() <= 2 + 1e-6).all() and ((cols - 13.5).abs() <= 2 + 1e-6).all()
    low, high = 0.9 * 16 * 0.8**2, 1.1 * 16 * 1.2**2  # area x zoom^2, +-10 % interpolation
    assert ((mass >= low) & (mass <= high)).all()
    assert rows.std() > 0.5 and mass.std() > 0.5  # each image its own draw


@pytest.mark.parametrize(("degrees", "scale", "shift"), [(-1, 0, 0), (0, 1.0, 0), (0, 0, -1)])
def test_random_affine_rejects_bad_ranges(degrees, scale, shift):
    with pytest.raises(ValueError, match="random_affine needs"):
        random_affine(torch.zeros(1, 1, 4, 4), degrees, scale, shift)
