"""Helpers of the shim tests' fixtures (conftest.py: `serve`, `attach`, `dev`): a real `gpupool serve` subprocess
(fake GPUs, loopback, port 0), and a `gpupool:<i>` device attached to it for each test (detached, so the daemon frees
everything, after)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from support import TEST_HOST, mint_token, start_serve_process, stop_process


@dataclass
class ServeProcess:
    address: str
    key: bytes
    process: Any

    def token(self, **kwargs: Any) -> str:
        kwargs.setdefault("host", TEST_HOST)
        return mint_token(self.key, **kwargs)


def start_daemon(
    tmp: Path, memory: str = "2GiB", gpus: int = 1, *flags: str, env: dict[str, str] | None = None
) -> ServeProcess:
    key = secrets.token_hex(32).encode()
    key_file = tmp / "token.key"
    key_file.write_bytes(key + b"\n")
    proc, address = start_serve_process(
        key_file, "--fake-gpus", str(gpus), "--fake-gpu-memory", memory, *flags, env=env
    )
    return ServeProcess(address, key, proc)


def withholding_daemon(factory: pytest.TempPathFactory, *features: str) -> Iterator[ServeProcess]:
    """A module fixture's body (`yield from`): a daemon (one 1 GiB fake GPU) that withholds `features`
    (GPUPOOL_WITHHOLD_FEATURES: its AttachReply does not name them and it refuses what they allow, as a daemon from
    before they were made), stopped after the module."""
    env = {"GPUPOOL_WITHHOLD_FEATURES": ",".join(features)}
    daemon = start_daemon(factory.mktemp("withholds-" + "-".join(features)), "1GiB", 1, env=env)
    yield daemon
    stop_process(daemon.process)


Attach = Callable[..., torch.device]
