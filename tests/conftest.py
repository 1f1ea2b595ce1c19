"""Shared fixtures: a token key, a token minting helper, real daemons in-process (fake GPUs, loopback, port 0)
and `gpupool serve` as a subprocess. Every daemon started here is stopped in teardown.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpupool import tokens

TEST_HOST = "test-host"
MiB = 1024**2


@pytest.fixture
def token_key() -> bytes:
    """A fresh shared key (64 hex characters, as `generate_key_file` writes)."""
    return secrets.token_hex(32).encode()


@pytest.fixture
def token_key_file(tmp_path: Path, token_key: bytes) -> Path:
    path = tmp_path / "token.key"
    path.write_bytes(token_key + b"\n")
    return path


def mint_token(
    key: bytes,
    *,
    host: str = TEST_HOST,
    device: int = 0,
    share: float = 1.0,
    quota_bytes: int = 0,
    ttl: float = 3600.0,
    tenant: str = "",
    lease_id: str = "",
) -> str:
    """A signed lease token for tests (negative ttl: already expired)."""
    claims = tokens.TokenClaims(
        lease_id=lease_id or uuid.uuid4().hex,
        host=host,
        device=device,
        quota_bytes=quota_bytes,
        share=share,
        expires_at=time.time() + ttl,
        tenant=tenant,
    )
    return tokens.mint(key, claims)


@dataclass
class DaemonHandle:
    """A daemon started for a test: its address, key, and a way to mint tokens for it."""

    address: str
    key: bytes
    host_id: str
    running: Any = None  # the in-process RunningDaemon (None for subprocesses)
    process: subprocess.Popen[str] | None = None
    metrics_port: int = 0
    log_lines: list[str] = field(default_factory=list)

    def token(self, **kwargs: Any) -> str:
        kwargs.setdefault("host", self.host_id)
        return mint_token(self.key, **kwargs)


DaemonFactory = Callable[..., DaemonHandle]


@pytest.fixture
def daemon_factory(token_key: bytes) -> Iterator[DaemonFactory]:
    """Start in-process daemons: `daemon_factory(fake_gpus=2, fake_gpu_memory=64 * MiB, **Config fields)`."""
    from gpupool.server.app import RunningDaemon
    from gpupool.server.daemon import Config

    started: list[RunningDaemon] = []

    def start(**overrides: Any) -> DaemonHandle:
        fields: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "host_id": TEST_HOST,
            "fake_gpus": 1,
            "fake_gpu_memory": 256 * MiB,
            "token_key": token_key,
            "metrics_listen": "127.0.0.1:0",
        }
        fields.update(overrides)
        running = RunningDaemon(Config(**fields))
        started.append(running)
        return DaemonHandle(
            running.address, fields["token_key"], fields["host_id"], running=running, metrics_port=running.metrics_port
        )

    yield start
    for running in started:
        running.stop(grace=1.0, drain=False)


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> DaemonHandle:
    """One in-process daemon with one 256 MiB fake GPU."""
    return daemon_factory()


_LISTEN_RE = re.compile(r"listening on (\S+:\d+)")


def start_serve_process(
    key_file: Path, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None, host_id: str = TEST_HOST
) -> tuple[subprocess.Popen[str], str]:
    """Run `gpupool serve --listen 127.0.0.1:0 ...` and return (process, bound address) parsed from its log."""
    cmd = [
        sys.executable,
        "-m",
        "gpupool.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "0",
        "--token-key-file",
        str(key_file),
        "--host-id",
        host_id,
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    proc.log_lines = []  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = _LISTEN_RE.search(line)
        if m:
            # Keep reading its log so a chatty daemon never blocks on a full pipe.
            threading.Thread(target=_drain, args=(proc,), daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    out = proc.communicate(timeout=10)[0]
    raise RuntimeError(f"gpupool serve did not start (exit {proc.returncode}): {out}")


def _drain(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            proc.log_lines.append(line)  # type: ignore[attr-defined]
    except (OSError, ValueError):
        pass


def stop_process(proc: subprocess.Popen[str], timeout: float = 20.0) -> int:
    """SIGTERM, wait, and SIGKILL as a last resort; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture
def serve_process(token_key_file: Path, token_key: bytes) -> Iterator[Callable[..., DaemonHandle]]:
    """Start `gpupool serve` subprocesses: `serve_process("--fake-gpus", "1")` -> DaemonHandle."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> DaemonHandle:
        proc, address = start_serve_process(token_key_file, *args, env=env)
        procs.append(proc)
        return DaemonHandle(address, token_key, TEST_HOST, process=proc)

    yield start
    for proc in procs:
        stop_process(proc)
