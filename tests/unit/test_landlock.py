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

PROBE = textwrap.dedent(
    """
    def probe(checks):  # each (what, fn, *args): "open" where fn(*args) returned, else the errno it raised
        got = {}
        for what, fn, *args in checks:
            try:
                fn(*args)
                got[what] = "open"
            except OSError as exc:
                got[what] = exc.errno
        return got

    def read(path):
        with open(path, "rb") as f:
            f.read(64)
    """
)  # the children's shared prelude: a probe reports each reach, open or refused, and goes on

CHILD = PROBE + textwrap.dedent(
    """
    import ctypes, json, os, socket, sys
    from gpupool.server import landlock
    version, key, port, scratch = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # no_new_privs, as the sandbox sets before it
    applied, missing = landlock.restrict(network=False, gpu=False, version=version)
    got = {"applied": applied, "missing": missing}
    got |= probe((("read key", read, key),
                  ("write", lambda: os.close(os.open(os.path.join(scratch, "made"), os.O_WRONLY | os.O_CREAT))),
                  ("connect", lambda: socket.create_connection(("127.0.0.1", port), timeout=5).close()),
                  ("import", __import__, "json.tool")))
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
    assert got["read key"] == got["write"] == 13, got  # EACCES
    assert got["import"] == "open", got  # a module imported lazily from Python's installation
    assert got["connect"] == (13 if landlock.abi() >= 4 else "open"), got
    assert not (tmp_path / "scratch" / "made").exists()


def test_an_older_abi_confines_what_it_can_and_says_what_it_lacks(tmp_path: Path) -> None:
    """As on a kernel of ABI 3 (Linux 6.2-6.6): files confined, TCP not (ABI 4), nor signals and abstract sockets
    (ABI 6); the worker starts anyway and its report names each."""
    got = confined(3, tmp_path)
    assert got["read key"] == got["write"] == 13, got
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


PROC_CHILD = PROBE + textwrap.dedent(
    """
    import ctypes, json, os
    from gpupool.server import landlock
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
    landlock.restrict(network=False, gpu=False)
    me = os.getpid()
    reads = ("/proc/self/net/tcp", "/proc/self/net/unix", "/proc/net/tcp6", "/proc/thread-self/net/unix",
             f"/proc/self/task/{me}/net/tcp", "/proc/self/status", "/proc/self/maps", "/proc/self/stat",
             f"/proc/self/task/{me}/stat", "/proc/self/cwd/.", "/proc/self/root/etc/hostname")
    lists = ("/proc/self/fd", "/proc/self/task", "/proc/self/root")
    got = probe([(path, read, path) for path in reads] + [(path, os.listdir, path) for path in lists])
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


EVICT_CHILD = PROBE + textwrap.dedent(
    """
    import ctypes, json, os, sys
    from gpupool.server import landlock
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
    landlock.restrict(network=False, gpu=False)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent dropped the kernel's dentries meanwhile
    got = probe((path, read, path) for path in ("/proc/self/status", "/proc/self/maps", "/proc/self/stat",
                                                "/proc/self/limits", "/proc/sys/vm/overcommit_memory"))
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


NET_CHILD = PROBE + textwrap.dedent(
    """
    import ctypes, json, os, socket, sys
    from gpupool.server import landlock
    low, high, inside, outside, gloo, version = (int(a) for a in sys.argv[1:7])
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
    applied, missing = landlock.restrict(network=True, gpu=False, ports=(low, high), gloo=bool(gloo), version=version)
    got = {"applied": applied, "missing": missing}

    def bind(port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))

    def bind_free(low, high):  # a port of the range another process (a test's daemon) does not hold
        for port in range(low, high + 1):
            try:
                return bind(port)
            except OSError as exc:
                if exc.errno != 98 or port == high:  # EADDRINUSE
                    raise

    got |= probe((("connect inside", lambda: socket.create_connection(("127.0.0.1", inside), 5).close()),
                  ("connect outside", lambda: socket.create_connection(("127.0.0.1", outside), 5).close()),
                  ("bind in the range", bind_free, low + 1, high),
                  ("bind outside", bind_free, outside + 1, outside + 64),  # (outside + 1 may be another's)
                  ("bind port 0", bind, 0),
                  ("read /proc/self/net/tcp", read, "/proc/self/net/tcp"),
                  ("list /sys/devices", os.listdir, "/sys/devices"),
                  ("read /etc/hosts", read, "/etc/hosts")))
    print(json.dumps(got))
    """
)


def network_confined(gloo: bool, version: int = -1) -> dict[str, object]:
    """A process confined as a worker granted network, its --collective-ports a range of 8 with a listener in it (at
    its low end) and one outside (the daemon's or the scheduler's loopback port)."""
    from gpupool.server.seclink import bind_in

    inside = bind_in((30100, 30355), lambda port: socket.create_server(("127.0.0.1", port)))
    low = inside.getsockname()[1]
    with inside, socket.create_server(("127.0.0.1", 0)) as outside:
        args = [low, low + 7, low, outside.getsockname()[1], int(gloo), version]
        out = subprocess.run([sys.executable, "-c", NET_CHILD, *map(str, args)], capture_output=True, text=True,
                             timeout=120, check=True)  # fmt: skip
    return dict(json.loads(out.stdout))


@pytest.mark.skipif(landlock.abi() < 4, reason="TCP rules need Landlock ABI 4")
def test_a_worker_granted_network_binds_and_connects_in_its_collective_ports_only() -> None:
    """Round 41's audit: a worker granted network (the secure links) connected to any TCP port (the daemon's and
    the scheduler's loopback ports included), listened on any, read the host's connections (/proc/self/net) and all
    of /sys/devices. Now: TCP bind and connect in --collective-ports only (and port 53), neither `net` nor /sys.
    On ca5fb68 `restrict` took no ports: every reach below was open."""
    got = network_confined(gloo=False)
    assert any("TCP bind and connect in ports" in line for line in got["applied"]), got  # type: ignore[attr-defined]
    want = {
        "connect inside": "open",
        "connect outside": 13,
        "bind in the range": "open",
        "bind outside": 13,
        "bind port 0": 13,
        "read /proc/self/net/tcp": 13,
        "list /sys/devices": 13,
        "read /etc/hosts": "open",
    }
    assert {k: got[k] for k in want} == want, got  # fmt: skip


@pytest.mark.skipif(landlock.abi() < 4, reason="TCP rules need Landlock ABI 4")
def test_a_gloo_worker_connects_anywhere_but_binds_its_range_or_a_port_the_kernel_picks() -> None:
    """`--collectives gloo`: gloo's pairs dial the ports their peers' kernels picked, so connect stays open; a fixed
    port outside the range cannot be bound (on ca5fb68 any could), and gloo's /sys entries are read."""
    got = network_confined(gloo=True)
    want = {
        "connect inside": "open",
        "connect outside": "open",
        "bind in the range": "open",
        "bind outside": 13,
        "bind port 0": "open",
        "read /proc/self/net/tcp": 13,
        "list /sys/devices": "open",
    }
    assert {k: got[k] for k in want} == want, got  # fmt: skip


def test_on_an_older_abi_a_worker_granted_network_keeps_working_and_says_what_it_lacks() -> None:
    """As on a kernel of ABI 3 (Linux 6.2-6.6): no TCP rules, so the worker binds and connects anywhere (its
    collectives still bind and dial --collective-ports only: server/collectives.py), and its report says so."""
    got = network_confined(gloo=False, version=3)
    assert got["connect inside"] == got["connect outside"] == got["bind outside"] == "open", got
    assert "TCP bind and connect (ABI 4)" in " ".join(map(str, got["missing"])), got  # type: ignore[call-overload]
    assert got["read /proc/self/net/tcp"] == 13, got  # (files: ABI 1)
