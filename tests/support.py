"""Test helpers shared by every test folder: a token minting helper, daemon handles, and `gpupool serve` as a
subprocess. A plain module (not a conftest) so test files can import it by name without clashing with the
conftest.py files of other folders.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpupool import tokens

TEST_HOST = "test-host"
MiB = 1024**2


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


class Program:
    """`python -m gpupool.cli ARGS` with its output in a log file; finds lines in that log (bound ports)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self._log_file = log.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPUPOOL_LOG_LEVEL": "INFO"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpupool.cli", *args], stdout=self._log_file, stderr=subprocess.STDOUT, env=env
        )

    def wait_for(self, pattern: str, timeout: float = 90.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log.read_text(errors="replace"))
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never appeared; exit {self.proc.poll()}; log:\n{self.log.read_text()}")

    def ports(self) -> tuple[int, int]:
        """(gRPC port, metrics port) from the startup log."""
        grpc_port = int(self.wait_for(r"listening on \S*?:(\d+)").group(1))
        metrics_port = int(self.wait_for(r"metrics on http://\S*?:(\d+)/metrics").group(1))
        return grpc_port, metrics_port

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
