"""Backbones of the tasks: the NeuralSort paper's small ConvNet, PreAct-ResNet18, a linear head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Classifier", "ConvNet", "PreActResNet18", "SortCNN", "embed", "make_backbone"]


class ConvNet(nn.Module):
    """The small ConvNet of the NeuralSort dKNN code: two 5x5 convs (20, 50 channels) with 2x2
    max-pooling, then a 500-unit ReLU layer. ``(B, C, H, W) -> (B, 500)``.

    On 28x28 input it is the reference network exactly; smaller images (8x8 digits) get padding.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, embedding_dim: int = 500):
        super().__init__()
        pad = 0 if image_size >= 28 else 2
        self.conv1 = nn.Conv2d(in_channels, 20, 5, 1, pad)
        self.conv2 = nn.Conv2d(20, 50, 5, 1, pad)
        with torch.no_grad():
            flat = self._features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc1 = nn.Linear(flat, embedding_dim)
        self.embedding_dim = embedding_dim

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc1(self._features(x)))


class _PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (He et al., 2016) as an embedding: ``(B, C, H, W) -> (B, 512)``."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, in_planes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [_PreActBlock(in_planes, planes, stride), _PreActBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.embedding_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class Classifier(nn.Module):
    """A backbone with a linear head: the paper's "CNN" baseline row."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embedding_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def make_backbone(name: str, image_shape: tuple[int, int, int]) -> nn.Module:
    """``convnet`` / ``resnet18`` / ``auto`` (ConvNet for 1-channel 28x28 or smaller images,
    PreAct-ResNet18 for colour images)."""
    c, h, _ = image_shape
    if name == "auto":
        name = "convnet" if c == 1 else "resnet18"
    if name == "convnet":
        return ConvNet(c, h)
    if name == "resnet18":
        return PreActResNet18(c)
    raise ValueError(f"unknown backbone {name!r}; choose auto, convnet or resnet18")


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 1000):
    """Apply ``model`` to ``x`` in batches (eval mode), returning the outputs on ``device``."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


class SortCNN(nn.Module):
    """The NeuralSort sorting CNN: two 5x5 conv layers (32, 64 channels) with 2x2 max-pooling,
    a 64-unit layer and a scalar score. ``(B, 1, 28, 28 * l) -> (B,)``.

    ``forward(tiles, index)`` scores numbers that share digit images: ``tiles (U, 1, 28, 28)``
    are digit images and ``index (B, l)`` says which tiles make each number, left to right;
    the result is ``(B,)``, the scores of the ``B`` numbers drawn side by side. Each tile goes
    through the convolutions once, and only the columns where two tiles meet are convolved per
    number (``_shared``), so a step whose tiles each appear in several numbers costs less. It is
    the same function (up to rounding) whenever the two outer pixel columns of every tile are
    blank; ink there changes the first layer's output at the tile's edge only.
    """

    def __init__(self, num_digits: int = 4):
        super().__init__()
        self.num_digits = num_digits
        self.conv1 = nn.Conv2d(1, 32, 5, 1, 2)
        self.conv2 = nn.Conv2d(32, 64, 5, 1, 2)
        self.fc1 = nn.Linear(64 * 7 * 7 * num_digits, 64)
        self.fc2 = nn.Linear(64, 1)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        # Pooling before the ReLU is the same map (ReLU is monotone) on 4x fewer elements, and
        # channels-last convolutions are faster on CPU.
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        if index is None:
            x = F.relu(F.max_pool2d(self.conv2(x), 2))
        else:
            x = self._shared(x, index)
        return self.fc2(F.relu(self.fc1(x.flatten(1)))).squeeze(-1)

    def _shared(self, a: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``a (U, 32, 14, 14)``, the tiles after the first layer, and ``index (B, l)`` ->
        ``(B, 64, 7, 7 * l)``, the numbers after the second layer.

        Of a number's second-layer output, the pooled column either side of a boundary between
        two tiles (conv2 columns 12-13 of the left tile, 0-1 of the right) reads the first
        layer's output of both tiles; every other column reads one tile only, so is computed
        once per tile, however many numbers the tile is in."""
        if index.ndim != 2 or index.shape[1] != self.num_digits:
            shape = tuple(index.shape)
            raise ValueError(f"index must be (numbers, {self.num_digits}) tiles, got {shape}")
        b, l = index.shape
        p = F.relu(F.max_pool2d(self.conv2(a), 2))  # (U, 64, 7, 7): each tile alone
        pt = p.index_select(0, index.flatten()).view(b, l, 64, 7, 7)
        if l > 1:  # the 8 columns about each inner boundary -> its 2 pooled columns
            left, right = index[:, :-1].flatten(), index[:, 1:].flatten()
            strip = [a[..., 10:].index_select(0, left), a[..., :4].index_select(0, right)]
            s = F.conv2d(torch.cat(strip, -1), self.conv2.weight, self.conv2.bias, padding=(2, 0))
            s = F.relu(F.max_pool2d(s, 2)).view(b, l - 1, 64, 7, 2)
            first = torch.cat([pt[:, :1, ..., :1], s[..., 1:]], 1)  # each tile's first column
            last = torch.cat([s[..., :1], pt[:, -1:, ..., 6:]], 1)  # and its last
            pt = torch.cat([first, pt[..., 1:6], last], -1)
        return pt.permute(0, 2, 3, 1, 4).reshape(b, 64, 7, 7 * l)
