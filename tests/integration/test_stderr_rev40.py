"""Descriptor 2 of the daemon and the scheduler (gpupool/logsink.py) at the edges: a program started with its stderr
closed, C code that writes there holding the GIL."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gpupool.client.session import Handle, Session
from support import MiB, listening_sockets, mint_token, process_tree, public_key_file, stop_process


def _listening_port(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The port of the one TCP socket the daemon (and its children) listen on, once there is one: it binds
    127.0.0.1:0 itself, and with its stderr closed its "listening on" line goes nowhere, so the kernel says which
    (support.listening_sockets). Until round 51 the test bound port 0, closed it and passed the number on: any other
    process could take the port in between (the daemon then failed to start, or the test spoke to a stranger)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the daemon exited ({proc.returncode})"
        found = listening_sockets(process_tree(proc.pid))
        if found:
            assert len(found) == 1, found  # (--metrics-listen 0, no --bulk-listen: its gRPC port only)
            [(address, port)] = found
            assert address == "127.0.0.1", found
            return port
        time.sleep(0.5)
    raise AssertionError("the daemon never listened")


def test_a_daemon_started_with_its_stderr_closed_serves_sessions(
    tmp_path: Path, token_key_file: Path, token_key: bytes
) -> None:
    """`gpupool serve 2>&-` (a supervisor that closes the descriptor): the first descriptor the daemon opens takes
    number 2, and its log lines went there (on 38080f0 the zygote's control socket: "the zygote died", no session
    started). Now `gpupool` opens /dev/null on a closed 0, 1 or 2 first (gpupool/cli.py `standard_descriptors`)."""
    cmd = [sys.executable, "-m", "gpupool.cli", "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "0"]
    cmd += ["--token-public-keys", str(public_key_file(token_key_file)), "--host-id", "test-host"]
    cmd += ["--fake-gpus", "1", "--fake-gpu-memory", "256MiB"]
    proc = subprocess.Popen(["sh", "-c", 'exec "$@" 2>&-', "sh", *cmd], stdout=subprocess.DEVNULL)
    try:
        port = _listening_port(proc, 150)
        for _ in range(3):
            token = mint_token(token_key, host="test-host", quota_bytes=16 * MiB)
            with Session.attach(f"127.0.0.1:{port}", token) as s:
                [h] = s.call("aten::mul.Tensor", Handle(s.upload(torch.arange(4.0))), 3)
                assert torch.equal(s.download(h), torch.arange(4.0) * 3)
    finally:
        stop_process(proc)  # type: ignore[arg-type]


GIL_HELD = """
import ctypes, sys
from gpupool import logsink
logsink.install(limit=16 << 20)  # (room for all of it: the pump drops nothing)
lines = int(sys.argv[1])
data = b"".join(b"held %07d\\n" % i for i in range(lines))  # in one write by C code holding the GIL
ctypes.PyDLL(None).write(2, data, len(data))  # (ctypes.PyDLL keeps the GIL through the call)
print("wrote", flush=True)
"""


@pytest.mark.parametrize("lines", [40_000, 400_000])  # 480 KB, 4.8 MB
def test_c_code_that_holds_the_gil_writes_to_descriptor_2_without_deadlock(tmp_path: Path, lines: int) -> None:
    """C code writing to descriptor 2 while it holds the GIL (a C extension's fprintf; here ctypes.PyDLL's write):
    it returns, and every byte reaches the real stderr in order. On 38080f0 the pipe held 64 KiB and the pump was a
    thread of the program, which cannot run until the write returns: a write of 500 KB never returned (the process
    hung for good; its stderr a file, which never blocks); round 40's review made the pipe 1 MiB (F_SETPIPE_SZ), and
    4.8 MB still hung on 50464ae. Since round 41 the pump is a process of its own (sched41), with its own GIL."""
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", GIL_HELD, str(lines)], stdout=subprocess.PIPE, stderr=err)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("the write to descriptor 2 never returned: the pump could not drain it") from None
    assert out == b"wrote\n" and proc.returncode == 0
    got = (tmp_path / "stderr").read_bytes()
    assert got == b"".join(b"held %07d\n" % i for i in range(lines)), (len(got), got[-40:])
