"""What attacker code in a confined session worker reaches of other sessions and of the host (round 41's audit): real
workers, forked and confined by a real zygote as a daemon's are (tests/integration/worker_attacks.py's zygote
program), each run `probe_reach` below once confined, under several sandbox settings; one row a reach, one column a
setting, and with --against a base checkout's zygote (its own Python and worker code) beside each.

Reaches: sibling workers' and the zygote's /proc/PID (mem, environ, cmdline, fd, maps), a same-user process's (a
stand-in for a non-root daemon: a process of the workers' user), the process list, the host's connections
(/proc/self/net), the mount table, /tmp, /dev/shm and another session's files there, a TLS key and a state folder,
/etc, /sys's PCI devices, /dev; signal 0 to siblings, the zygote, the stand-in, this process and init; a path and an
abstract unix socket, a loopback TCP port outside the daemon's --collective-ports (as the daemon's and the
scheduler's are) and one inside, UDP, a TCP listener (on a port the kernel picks, in the range, and by `listen()` on a
socket never bound); and earlier sessions' ids (bearer credentials) in the
worker's own memory (here sent as the zygote is sent them: so this row shows the zygote's memory keeps them, which
is why the daemon sends none since round 41: test_a_workers_memory_holds_no_other_sessions_id). Root only.

    nice -n 5 .venv/bin/python bench/worker_reach.py --against /work/wt/base \
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
try:
    from gpupool.protocol import COLLECTIVE_PORTS  # the daemon's default --collective-ports
except ImportError:  # a base checkout's (before round 42): this one's
    COLLECTIVE_PORTS = (30100, 30355)
MiB = 1 << 20
# (round 43) a network worker's session's block of the range (server/portshare.py; a base spec without the field
# drops it: its worker may bind the whole range)
BLOCK = (COLLECTIVE_PORTS[0] + 4, COLLECTIVE_PORTS[0] + 7)
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "seccomp off": {"seccomp": False},
    "landlock off": {"landlock": False},
    "network": {"network": True, "collective_share": BLOCK},
    "network gloo": {"network": True, "collectives": "gloo", "collective_share": BLOCK},
}


def _why(exc: OSError) -> str:
    return f"blocked {errno.errorcode.get(exc.errno or 0, exc.errno)}"


def probe_reach(ctx: dict[str, Any]) -> str:
    """Runs in the worker: each reach of `ctx` tried ("open ..." or "blocked ERRNO"), as "report: " and JSON."""
    out: dict[str, Any] = {}
    for name, path in ctx["read"].items():
        try:
            if os.path.isdir(path):
                out[f"read {name}"] = f"open: {len(os.listdir(path))} entries"
            else:
                with open(path, "rb") as f:
                    out[f"read {name}"] = f"open: {len(f.read(4096))} bytes"
        except OSError as exc:
            out[f"read {name}"] = _why(exc)
    for name, pid in ctx["signal"].items():
        try:
            os.kill(pid, 0)
            out[f"signal 0 to {name}"] = "open"
        except OSError as exc:
            out[f"signal 0 to {name}"] = _why(exc)
    for name, address in ctx["unix"].items():
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(address)
            out[f"connect {name}"] = "open"
        except OSError as exc:
            out[f"connect {name}"] = _why(exc)
    try:
        socket.create_connection(("127.0.0.1", ctx["tcp"]), timeout=3).close()
        out["connect loopback TCP"] = "open"
    except OSError as exc:
        out["connect loopback TCP"] = _why(exc)
    try:  # (a stream socket, not TCP: Landlock's port rules hold TCP only; round 43 review)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262) as s:
            s.settimeout(3)
            s.connect(("127.0.0.1", ctx["tcp"]))
        out["connect loopback TCP over MPTCP"] = "open"
    except OSError as exc:
        out["connect loopback TCP over MPTCP"] = _why(exc)
    try:
        for end in socket.socketpair():
            end.close()
        out["socketpair (unix sockets)"] = "open"
    except OSError as exc:
        out["socketpair (unix sockets)"] = _why(exc)
    named = []  # its link to the daemon bound to an abstract name (as server/portshare.py's that hold ports)
    for fd in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=int(fd))
        except OSError:
            continue
        try:
            if s.family == socket.AF_UNIX:
                s.bind(f"\0gpupool-reach-{os.getpid()}-{fd}")
                named.append(fd)
        except OSError as exc:
            out["bind its unix link to an abstract name"] = _why(exc)
        finally:
            s.detach()
    if named:
        out["bind its unix link to an abstract name"] = "open"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", ("127.0.0.1", ctx["tcp"]))
        out["send UDP"] = "open"
    except OSError as exc:
        out["send UDP"] = _why(exc)
    try:
        socket.create_connection(("127.0.0.1", ctx["range_port"]), timeout=3).close()
        out["connect a port of --collective-ports"] = "open"
    except OSError as exc:
        out["connect a port of --collective-ports"] = _why(exc)
    try:
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            s.listen(1)
        out["listen TCP"] = "open"
    except OSError as exc:
        out["listen TCP"] = _why(exc)
    block = range(ctx["block"][0], ctx["block"][1] + 1)
    outside = [p for p in range(ctx["range"][0], ctx["range"][1] + 1) if p not in block]
    for row, ports in (("listen TCP in its session's block of the range", block),
                       ("listen TCP in --collective-ports, outside its block", outside)):  # fmt: skip
        bound, why = 0, "blocked EADDRINUSE"
        for port in ports:  # (one at a time: how many of them it could take)
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
                    s.listen(1)
                bound += 1
            except OSError as exc:
                why = why if exc.errno == errno.EADDRINUSE else _why(exc)
        out[row] = f"open: {bound} of {len(ports)}" if bound else why
    try:
        with socket.socket() as s:
            s.listen(1)  # the kernel binds it to a port of its choosing: Landlock ABI 7 does not check this
        out["listen TCP, never bound"] = "open"
    except OSError as exc:
        out["listen TCP, never bound"] = _why(exc)
    found = set(_SCAN[0](ctx["prefixes"]))  # earlier sessions' ids in its own writable memory (no permission needed)
    out["earlier specs' session ids in its memory"] = f"{len(found & set(ctx['ids']))} of {len(ctx['ids'])}"
    return "report: " + json.dumps(out)


_SCAN: list[Any] = []  # this checkout's worker_attacks.memory_secrets (a base's worker_attacks may lack it)


def zygote_program(tree: str) -> None:
    """The zygote of `tree` (its worker code), with worker_attacks' hook and `probe_reach` added."""
    import importlib.util

    mine = importlib.util.spec_from_file_location("reach_attacks", ROOT / "tests" / "integration" / "worker_attacks.py")
    assert mine is not None and mine.loader is not None
    attacks = importlib.util.module_from_spec(mine)
    mine.loader.exec_module(attacks)
    _SCAN.append(attacks.memory_secrets)
    sys.path.insert(0, os.path.join(tree, "tests", "integration"))
    import worker_attacks

    worker_attacks.PROBES["reach"] = probe_reach
    worker_attacks._install()
    from gpupool.server import zygote

    sys.argv = [sys.argv[0], sys.argv[-1]]
    zygote.main()


def run(python: str, tree: str) -> dict[str, dict[str, str]]:
    """Every setting's reaches, from workers of `tree`'s zygote (run by `python`)."""
    env = {**os.environ, "PYTHONPATH": tree}
    code = (
        "import sys, json, runpy\n"
        f"sys.path.insert(0, {tree!r}); sys.path.insert(0, {os.path.join(tree, 'tests', 'integration')!r})\n"
        f"m = runpy.run_path({__file__!r}, run_name='worker_reach')\n"
        "print(json.dumps(m['_survey'](sys.argv[1])))\n"
    )
    out = subprocess.run([python, "-c", code, tree], capture_output=True, text=True, env=env, timeout=900, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: {out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _survey(tree: str) -> dict[str, dict[str, str]]:
    import dataclasses
    import pwd

    import worker_attacks
    from gpupool.server.worker import WorkerSpec
    from gpupool.server.zygote import Zygote

    known = {f.name for f in dataclasses.fields(WorkerSpec)}  # a base's spec may lack a field (collective_ports)

    def spec(session_id: str, **kw: Any) -> WorkerSpec:
        fields: dict[str, Any] = {
            "session_id": session_id, "number": 1, "quota": 64 * MiB, "max_handles": 1000, "max_op_flops": 0,
            "device": {"index": 0, "uuid": "fake-0", "model": "fake", "memory_bytes": 1 << 30, "fake": True},
            "memory_limit": 64 * MiB + 1024 * MiB, "cpu_threads": 1, "user": "nobody", "seccomp": True,
        }  # fmt: skip
        return WorkerSpec(**{k: v for k, v in {**fields, **kw}.items() if k in known})

    z = Zygote(program=[sys.executable, __file__, "--zygote", tree])
    z.start()
    z.wait_ready()
    nobody = pwd.getpwnam("nobody")
    stand_in = subprocess.Popen(["sleep", "600"], user=nobody.pw_uid, group=nobody.pw_gid, env={"TOKEN": "x"})
    ids = [secrets.token_urlsafe(18) for _ in range(3)]  # sent as the zygote was sent them until round 41
    victims = [z.spawn(spec(i), MiB) for i in ids]
    scratch = tempfile.mkdtemp(prefix="gpupool-reach-")
    os.chmod(scratch, 0o755)
    key, state = os.path.join(scratch, "server.key"), os.path.join(scratch, "state")
    Path(key).write_text("a TLS key")
    os.mkdir(state)
    shm, tmp = "/dev/shm/gpupool-reach-other-session", os.path.join(scratch, "other-session")
    for path in (shm, tmp, key):
        Path(path).write_text("another session's bytes")
        os.chmod(path, 0o666)
    path_sock = os.path.join(scratch, "daemon.sock")
    listeners = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX), socket.socket()]
    listeners[0].bind(path_sock)
    os.chmod(path_sock, 0o777)
    listeners[1].bind("\0gpupool-reach")
    listeners[2].bind(("127.0.0.1", 0))
    listeners.append(_in_range_listener())
    for s in listeners:
        s.listen(8)
    v = victims[0].pid
    read = {f"a sibling's /proc/PID/{w}": f"/proc/{v}/{w}" for w in ("mem", "environ", "cmdline", "fd", "maps")}
    read.update({f"the zygote's /proc/PID/{w}": f"/proc/{z.pid}/{w}" for w in ("environ", "fd")})
    read.update({f"a same-user process's /proc/PID/{w}": f"/proc/{stand_in.pid}/{w}" for w in ("environ", "mem")})
    hosts = ("/proc", "/proc/self/net/tcp", "/proc/self/net/unix", "/proc/self/mountinfo", "/tmp", "/dev/shm",
             "/etc/passwd", "/sys/bus/pci/devices", "/sys/devices", "/dev")  # fmt: skip
    read.update({p: p for p in hosts})
    read.update({"another session's /tmp file": tmp, "another session's /dev/shm file": shm, "a TLS key": key,
                 "a state folder": state})  # fmt: skip
    ctx = {
        "read": read,
        "signal": {
            "a sibling": v,
            "the zygote": z.pid,
            "a same-user process": stand_in.pid,
            "the front (this bench, root)": os.getpid(),
            "init": 1,
        },  # fmt: skip
        "unix": {"a path unix socket": path_sock, "an abstract unix socket": "\0gpupool-reach"},
        "tcp": listeners[2].getsockname()[1],
        "range_port": listeners[3].getsockname()[1],
        "range": list(COLLECTIVE_PORTS),
        "block": list(BLOCK),
        "prefixes": [i[:6] for i in ids],
        "ids": ids,
    }
    got: dict[str, dict[str, str]] = {}
    try:
        for name, kw in SETTINGS.items():
            order = {"probes": ["reach"], "ctx": ctx}
            runner = z.spawn(spec(worker_attacks.PREFIX + json.dumps(order), **kw), MiB)
            answer = worker_attacks.read_report(runner._sock)["reach"]
            runner.close()
            got[name] = json.loads(answer[len("report: ") :]) if answer.startswith("report: ") else {"error": answer}
    finally:
        for r in victims:
            r.close()
        stand_in.kill()
        z.stop()
        for s in listeners:
            s.close()
        os.unlink(shm)
        shutil.rmtree(scratch)
    return got


def _in_range_listener() -> socket.socket:
    """A loopback socket on a free port of the default --collective-ports (listening once `_survey` calls listen)."""
    for port in range(COLLECTIVE_PORTS[0], COLLECTIVE_PORTS[1] + 1):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return s
        except OSError:
            s.close()
    raise SystemExit(f"no free port in {COLLECTIVE_PORTS}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--zygote":
        zygote_program(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default="", help="a base checkout: its workers' reaches beside these")
    ap.add_argument("--against-python", default=sys.executable)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("root only: workers drop to nobody as a root daemon's do")
    trees = {"": run(sys.executable, str(ROOT))}
    if args.against:
        trees["base "] = run(args.against_python, args.against)
    rows = list(next(iter(trees[""].values())))
    print(f"{'reach (open, or -ERRNO)':44} " + " ".join(f"{t + s:>18}" for s in SETTINGS for t in trees))
    for row in rows:
        cells = [str(trees[t][setting].get(row, "?")).replace("blocked ", "-").split(":")[0] for setting in SETTINGS
                 for t in trees]  # fmt: skip
        print(f"{row[:44]:44} " + " ".join(f"{c[:18]:>18}" for c in cells))


if __name__ == "__main__":
    main()
