"""server/landlock.py on this kernel: a ruleset applied in a child process (a worker's, without the rest of the
sandbox), and what an older kernel's ABI leaves out (best effort: said, not refused)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from gpupool.server import landlock

pytestmark = pytest.mark.skipif(landlock.abi() < 1, reason="this kernel has no Landlock")

CHILD = textwrap.dedent(
    """
    import ctypes, json, os, socket, sys
    from gpupool.server import landlock
    version, key, port, scratch = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # no_new_privs, as the sandbox sets before it
    applied, missing = landlock.restrict(network=False, gpu=False, version=version)
    got = {"applied": applied, "missing": missing}
    for what, fn in (("read key", lambda: open(key).read()),
                     ("write", lambda: os.close(os.open(os.path.join(scratch, "made"), os.O_WRONLY | os.O_CREAT))),
                     ("connect", lambda: socket.create_connection(("127.0.0.1", port), timeout=5).close()),
                     ("import", lambda: __import__("json.tool"))):
        try:
            fn()
            got[what] = "open"
        except OSError as exc:
            got[what] = f"blocked: {exc.errno}"
    print(json.dumps(got))
    """
)


def confined(version: int, tmp_path: Path) -> dict[str, object]:
    key = tmp_path / "server.key"
    key.write_text("a key")
    key.chmod(0o600)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with socket.socket() as service:
        service.bind(("127.0.0.1", 0))
        service.listen(4)
        out = subprocess.run([sys.executable, "-c", CHILD, str(version), str(key), str(service.getsockname()[1]),
                              str(scratch)], capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return dict(json.loads(out.stdout))


def test_a_confined_process_reads_python_only_writes_nothing_and_connects_nowhere(tmp_path: Path) -> None:
    got = confined(landlock.abi(), tmp_path)
    assert got["applied"] and got["applied"][0] == f"landlock ABI {landlock.abi()}", got
    assert got["read key"] == got["write"] == "blocked: 13", got  # EACCES
    assert got["import"] == "open", got  # a module imported lazily from Python's installation
    assert got["connect"] == ("blocked: 13" if landlock.abi() >= 4 else "open"), got
    assert not (tmp_path / "scratch" / "made").exists()


def test_an_older_abi_confines_what_it_can_and_says_what_it_lacks(tmp_path: Path) -> None:
    """As on a kernel of ABI 3 (Linux 6.2-6.6): files confined, TCP not (ABI 4), nor signals and abstract sockets
    (ABI 6); the worker starts anyway and its report names each."""
    got = confined(3, tmp_path)
    assert got["read key"] == got["write"] == "blocked: 13", got
    assert got["connect"] == "open", got
    lacking = " ".join(map(str, got["missing"]))  # type: ignore[call-overload]
    assert "TCP bind and connect (ABI 4)" in lacking and "signals and abstract unix sockets" in lacking, got


def test_the_daemons_warning_names_what_the_kernel_lacks() -> None:
    assert "no Landlock" in landlock.describe(0)
    assert landlock.describe(3) == (
        "Landlock ABI 3: session workers lack its confinement of TCP bind and connect (ABI 4), device ioctls "
        "(ABI 5), signals and abstract unix sockets outside the worker (ABI 6)"
    )
    assert landlock.describe(6) == landlock.describe(7) == ""
