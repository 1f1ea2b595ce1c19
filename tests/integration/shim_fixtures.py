"""Fixtures of the shim tests: a real `gpupool serve` subprocess (fake GPU, loopback, port 0) per module,
and a `gpupool:<i>` device attached to it for each test (detached, so the daemon frees everything, after)."""

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


def start_daemon(tmp: Path, memory: str = "2GiB") -> ServeProcess:
    key = secrets.token_hex(32).encode()
    key_file = tmp / "token.key"
    key_file.write_bytes(key + b"\n")
    proc, address = start_serve_process(key_file, "--fake-gpus", "1", "--fake-gpu-memory", memory)
    return ServeProcess(address, key, proc)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One daemon subprocess for the whole test module."""
    daemon = start_daemon(tmp_path_factory.mktemp("shim"))
    yield daemon
    stop_process(daemon.process)


Attach = Callable[..., torch.device]


@pytest.fixture
def attach(serve: ServeProcess) -> Iterator[Attach]:
    """`attach(quota_bytes=0, share=1.0)` -> a gpupool device on the module's daemon."""
    import gpupool.torch as gt

    def do(**claims: Any) -> torch.device:
        return gt.attach(serve.address, serve.token(**claims))

    yield do
    gt.detach_all()


@pytest.fixture
def dev(attach: Attach) -> torch.device:
    return attach()
