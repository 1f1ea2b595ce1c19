"""What the sentiment scripts share: picking the device (cpu, cuda or the remote gpupool) and logging."""

from __future__ import annotations

import importlib
import logging
import sys

import torch
from rich.logging import RichHandler

DEVICES = ("cpu", "cuda", "gpupool")


def resolve_device(name: str) -> torch.device:
    """cpu, cuda (a real local GPU) or gpupool (the device of the lease given by `gpupool run`).

    For gpupool, ``import gpupool.torch`` registers the device and ``gpupool.torch.device()`` attaches to the
    lease in $GPUPOOL_LEASE (set by `gpupool run`) or allocates one from $GPUPOOL_SCHEDULER.
    """
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device here (try --device gpupool or cpu)")
        return torch.device(name)
    if name == "gpupool" or name.startswith("gpupool:"):
        # Imported only here: registers the `gpupool` device; cpu/cuda runs never need the client.
        gpupool_torch = importlib.import_module("gpupool.torch")
        dev = gpupool_torch.device() if name == "gpupool" else name
        return torch.device(dev) if not isinstance(dev, torch.device) else dev
    raise SystemExit(f"unknown --device {name!r}; expected one of {', '.join(DEVICES)}")


def setup_logging(verbose: bool = False) -> None:
    """One log format for the example's scripts: through rich on a terminal (so it does not tear the progress
    bars), plain one-line records otherwise (CI logs, pipes)."""
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="[%X]",
                            handlers=[RichHandler(show_path=False)])  # fmt: skip
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
