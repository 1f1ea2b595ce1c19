"""Data and network of the transfer-learning example: scikit-learn's bundled digits and a small CNN.

The digits (``sklearn.datasets.load_digits``: 1,797 handwritten 8x8 images of 0-9, shipped inside the package,
no download) are split by class: the "base" classes pretrain the network, the held-out "novel" classes are
the small domain-specific task, of which only a few labelled examples per class are used for training.
Training batches can be augmented with random shifts of up to one pixel (on the CPU, before the upload);
`with_rotations` turns each base class into four (0, 90, 180, 270 degrees) for a richer pretraining task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Images:
    x: torch.Tensor  # float32 (N, 1, H, W) in [0, 1]: 8x8 or 28x28
    y: torch.Tensor  # int64 (N,): class index within its task (0..k-1)
    digits: tuple[int, ...]  # the digit each class index stands for

    def __len__(self) -> int:
        return len(self.y)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (1797, 8, 8) in [0, 1], labels int64 (1797,)) from scikit-learn."""
    from sklearn.datasets import load_digits as sk_load_digits  # the example's only use of scikit-learn

    bunch = sk_load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def task(images: np.ndarray, labels: np.ndarray, digits: tuple[int, ...]) -> Images:
    """The images of the given digits, relabelled 0..len(digits)-1 in that order."""
    rows = np.flatnonzero(np.isin(labels, digits))
    remap = {d: i for i, d in enumerate(digits)}
    y = np.asarray([remap[int(v)] for v in labels[rows]], dtype=np.int64)
    return Images(torch.from_numpy(images[rows]).unsqueeze(1), torch.from_numpy(y), digits)


def few_shot_split(data: Images, shots: int, seed: int) -> tuple[Images, Images]:
    """(train: `shots` random images per class, test: all the others), the same for the same seed."""
    rng = np.random.default_rng(seed)
    y = data.y.numpy()
    train_rows = np.concatenate([rng.choice(np.flatnonzero(y == c), size=shots, replace=False)
                                 for c in range(len(data.digits))])  # fmt: skip
    test_rows = np.setdiff1d(np.arange(len(y)), train_rows)
    pick = lambda rows: Images(data.x[rows], data.y[rows], data.digits)  # noqa: E731
    return pick(np.sort(train_rows)), pick(test_rows)


def with_rotations(data: Images) -> Images:
    """Each image in its four right-angle rotations, rotation r of class c labelled c + r * k (4k classes)."""
    k = len(data.digits)
    x = torch.cat([torch.rot90(data.x, r, dims=(2, 3)) for r in range(4)])
    y = torch.cat([data.y + r * k for r in range(4)])
    return Images(x, y, tuple(range(4 * k)))


def shift(x: torch.Tensor, gen: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Each image (N, 1, H, W) moved by up to `pixels` on each axis at random (zeros shift in)."""
    h, w, n = x.shape[2], x.shape[3], 2 * pixels + 1
    padded = nn.functional.pad(x, (pixels,) * 4)
    crops = torch.stack([padded[:, :, dy : dy + h, dx : dx + w] for dy in range(n) for dx in range(n)])
    pick = torch.randint(0, n * n, (x.shape[0],), generator=gen)
    return crops[pick, torch.arange(x.shape[0])]


class CosineHead(nn.Module):
    """Logits = scale * cos(feature, class weight). `imprint` sets each class's weight to the mean normalised
    feature of its examples (Qi et al., "Low-shot learning with imprinted weights", CVPR 2018)."""

    def __init__(self, weight: torch.Tensor, scale: float = 10.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.normalize(z, dim=1) @ nn.functional.normalize(self.weight, dim=1).T

    @classmethod
    @torch.no_grad()
    def imprint(cls, features: nn.Module, data: Images, device: torch.device) -> CosineHead:
        features.eval()
        z = nn.functional.normalize(features(data.x.to(device)), dim=1).cpu()
        means = torch.stack([z[data.y == c].mean(dim=0) for c in range(len(data.digits))])
        return cls(nn.functional.normalize(means, dim=1))


class DigitsCNN(nn.Module):
    """8x8 images (`size` 8): conv-relu x2, max-pool, conv-relu, max-pool -> 2*width x 2 x 2 features;
    28x28 images (`size` 28): (conv-relu, max-pool) x 3 -> 2*width x 3 x 3 features; then a linear head.

    The features keep a coarse layout: a global average would throw away where the strokes are, which is most
    of what tells a new digit from the old ones."""

    def __init__(self, num_classes: int, width: int = 32, size: int = 8) -> None:
        super().__init__()
        if size == 8:
            layers: list[nn.Module] = [
                nn.Conv2d(1, width, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]  # 4x4
            side = 2
        elif size == 28:
            layers = [
                nn.Conv2d(1, width, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),  # 14x14
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]  # 7x7
            side = 3
        else:
            raise ValueError(f"DigitsCNN takes 8x8 or 28x28 images, not {size}x{size}")
        layers += [nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = 2 * width * side * side
        self.head: nn.Module = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def new_head(self, num_classes: int) -> None:
        """Replace the classifier for a new task (the features are kept)."""
        self.head = nn.Linear(self.feature_dim, num_classes)


def fit(
    model: nn.Module,
    data: Images,
    device: torch.device,
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    params: list[nn.Parameter] | None = None,
    augment: bool = False,
    shift_pixels: int = 1,
) -> float:
    """Train `params` (default: all that require grad) for `steps` Adam steps on shuffled batches. Without
    `augment` the data are uploaded once; with it each batch is shifted on the CPU and uploaded. Returns the last
    step's loss."""
    gen = torch.Generator().manual_seed(seed)
    x, y = (data.x, data.y) if augment else (data.x.to(device), data.y.to(device))
    opt = torch.optim.Adam(params if params is not None else [p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = torch.zeros((), device=device)
    n = len(data)
    for _ in range(steps):
        rows = torch.randperm(n, generator=gen)[: min(batch_size, n)]
        if augment:
            xb, yb = shift(x[rows], gen, shift_pixels).to(device), y[rows].to(device)
        else:
            rows = rows.to(device)
            xb, yb = x.index_select(0, rows), y.index_select(0, rows)
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.item())


@torch.no_grad()
def accuracy(model: nn.Module, data: Images, device: torch.device) -> float:
    model.eval()
    pred = model(data.x.to(device)).argmax(dim=1).cpu()
    return float((pred == data.y).float().mean())
