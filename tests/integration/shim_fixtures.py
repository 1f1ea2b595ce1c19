"""Helpers of the shim tests' fixtures (conftest.py: `serve`, `attach`, `dev`): a real `gpupool serve` subprocess
(fake GPUs, loopback, port 0), and a `gpupool:<i>` device attached to it for each test (detached, so the daemon frees
everything, after)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from support import TEST_HOST, mint_token, start_serve_process


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


Attach = Callable[..., torch.device]
