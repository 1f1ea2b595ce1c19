"""server/landlock.py on this kernel: a ruleset applied in a child process (a worker's, without the rest of the
sandbox), and what an older kernel's ABI leaves out (best effort: said, not refused)."""

from __future__ import annotations

import json
import os
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


PROC_CHILD = textwrap.dedent(
    """
    import ctypes, json, os
    from gpupool.server import landlock
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
    landlock.restrict(network=False, gpu=False)
    me = os.getpid()
    got = {}
    for path in ("/proc/self/net/tcp", "/proc/self/net/unix", "/proc/net/tcp6", "/proc/thread-self/net/unix",
                 f"/proc/self/task/{me}/net/tcp", "/proc/self/status", "/proc/self/maps", "/proc/self/stat",
                 f"/proc/self/task/{me}/stat", "/proc/self/cwd/.", "/proc/self/root/etc/hostname"):
        try:
            with open(path, "rb") as f:
                f.read(64)
            got[path] = "open"
        except OSError as exc:
            got[path] = exc.errno
    for path in ("/proc/self/fd", "/proc/self/task", "/proc/self/root"):
        try:
            os.listdir(path)
            got[path] = "open"
        except OSError as exc:
            got[path] = exc.errno
    print(json.dumps(got))
    """
)


def test_a_confined_process_reads_its_own_proc_but_not_the_hosts_connections(tmp_path: Path) -> None:
    """Its own /proc/PID stays readable (maps, status, stat: Python, glibc and torch read them; its descriptors and
    threads listed), but not `net` under it, which is the network namespace's: the host's TCP connections (every
    tenant's client address and port, the daemon's listeners) and unix sockets. On 50464ae the rule on /proc/PID
    covered `net`, and each thread's under `task`; the magic links (cwd, root) lead nowhere either."""
    out = subprocess.run([sys.executable, "-c", PROC_CHILD], capture_output=True, text=True, timeout=120, check=True,
                         cwd=tmp_path)  # fmt: skip
    got = json.loads(out.stdout)
    refused = {path: 13 for path in got if "/net/" in path or "/cwd/" in path or "/root" in path or "/task/" in path}
    assert {path: got[path] for path in refused} == refused, got  # EACCES
    assert {path: v for path, v in got.items() if path not in refused} == {
        "/proc/self/status": "open", "/proc/self/maps": "open", "/proc/self/stat": "open", "/proc/self/fd": "open",
        "/proc/self/task": "open"}, got  # fmt: skip


EVICT_CHILD = textwrap.dedent(
    """
    import ctypes, json, os, sys
    from gpupool.server import landlock
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
    landlock.restrict(network=False, gpu=False)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent dropped the kernel's dentries meanwhile
    got = {}
    for path in ("/proc/self/status", "/proc/self/maps", "/proc/self/stat", "/proc/self/limits",
                 "/proc/sys/vm/overcommit_memory"):
        try:
            with open(path, "rb") as f:
                f.read(64)
            got[path] = "open"
        except OSError as exc:
            got[path] = exc.errno
    print(json.dumps(got))
    """
)
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


@pytest.mark.skipif(not os.access(DROP_CACHES, os.W_OK), reason="dropping the dentry cache needs root")
def test_a_confined_process_still_reads_its_own_proc_after_the_kernel_drops_its_dentries() -> None:
    """A rule belongs to an inode, and procfs makes a new inode for a name whose dentry was reclaimed (memory
    pressure; here `echo 2 > drop_caches`, host-wide, as root only): on 22f7ba0 (one rule an entry of /proc/PID,
    each descriptor closed) every entry the worker had not held was refused afterwards (EACCES: glibc's
    pthread_getattr_np, torch and CUDA read /proc/self/maps). The rules' descriptors are held now."""
    with subprocess.Popen([sys.executable, "-c", EVICT_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as child:  # fmt: skip
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        DROP_CACHES.write_text("2\n")
        out, _ = child.communicate("go\n", timeout=120)
    got = json.loads(out)
    assert got == dict.fromkeys(got, "open"), got
