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


def leased_memory(device: torch.device) -> tuple[int, float] | None:
    """The memory `gpupool run` leased on `device` (a `gpupool` device of the lease in $GPUPOOL_LEASE): (its quota in
    bytes, the share of the GPU it is); None for another device or a device not of such a lease."""
    if device.type != "gpupool":
        return None
    from gpupool.client.pool import Lease  # (no torch device code: both clients' children have it)

    try:
        lease = Lease.from_env()
    except Exception:  # noqa: BLE001 - a malformed lease is the client's to report, at attach
        return None
    index = device.index or 0
    if lease is None or index >= len(lease.devices) or lease.devices[index].quota_bytes <= 0:
        return None
    return lease.devices[index].quota_bytes, lease.devices[index].share


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued work, raising its first error (a remote device reports one only at a sync)."""
    if device.type == "gpupool":
        importlib.import_module("gpupool.torch").synchronize(device)
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


def setup_logging(verbose: bool = False) -> None:
    """One log format for the example's scripts: through rich on a terminal (so it does not tear the progress
    bars), plain one-line records otherwise (CI logs, pipes)."""
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="[%X]",
                            handlers=[RichHandler(show_path=False)])  # fmt: skip
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
