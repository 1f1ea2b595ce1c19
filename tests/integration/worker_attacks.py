"""Attacker code inside real, confined session workers (tests only: nothing on the wire reaches it).

Run as the zygote's program (`Zygote(program=[python, this file])`): it is server/zygote.py's `main`, whose
workers are forked and confined exactly as a daemon's (server/worker.py `worker_main`, server/sandbox.py), except
that a worker whose session id starts with `attack:` runs the probes its id names (JSON) once it is confined and
has set up its shared buffer, as a tenant that found a memory-safety bug in a kernel would (its code runs in the
worker), writes what each probe got as one JSON line on its session socket, and then serves as usual. Each probe
returns "blocked: why" or "open: what it reached"; `run_probes` never raises.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

PREFIX = "attack:"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86_64 system call numbers
NR = {
    "rt_sigqueueinfo": 129,
    "rt_tgsigqueueinfo": 297,
    "prlimit64": 302,
    "io_uring_setup": 425,
    "io_setup": 206,
    "bpf": 321,
    "userfaultfd": 323,
    "perf_event_open": 298,
    "keyctl": 250,
    "mount": 165,
    "execveat": 322,
    "process_vm_readv": 310,
    "ptrace": 101,
    "clone": 56,
    "ioprio_get": 252,
    "ioprio_set": 251,
    "shmget": 29,
    "shmctl": 31,
    "msgget": 68,
    "msgctl": 71,
    "semget": 64,
    "semctl": 66,
    "mq_open": 240,
    "mq_unlink": 241,
    "utime": 132,
    "fchmodat2": 452,
    "unshare": 272,
    "setxattr": 188,
    "memfd_secret": 447,
    "fanotify_init": 300,
}


def _sys(name: str, *args: Any) -> tuple[int, int]:
    ctypes.set_errno(0)
    ret = _libc.syscall(ctypes.c_long(NR[name]), *args)
    return int(ret), ctypes.get_errno()


def _verdict(ret: int, err: int, what: str = "") -> str:
    if ret < 0:
        return f"blocked: {errno.errorcode.get(err, err)}"
    return f"open: {what or f'returned {ret}'}"


def _oserror(fn: Callable[[], Any], what: str = "") -> str:
    try:
        got = fn()
    except OSError as exc:
        return f"blocked: {errno.errorcode.get(exc.errno or 0, exc.errno)}"
    return f"open: {what or repr(got)[:200]}"


# ---- the probes: ctx names the victim worker (`victim`: its pid), paths and the like ----


def probe_fds(ctx: dict[str, Any]) -> str:
    """Descriptors besides stdin/stdout/stderr, the worker's own session socket and the O_PATH descriptors its
    Landlock rules on /proc files hold (server/landlock.py `_PINNED`: its own /proc/PID entries' and the like, which
    it reads anyway)."""
    from gpupool.server import landlock

    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if fd <= 2 or fd == ctx["own_socket"] or target.startswith("/proc/") and "/fd" in target:
            continue
        if fd in landlock.held() and target.startswith("/proc/") and _is_o_path(fd):
            continue
        found.append(f"{fd} -> {target}")
    return f"open: {found}" if found else "blocked: nothing inherited"


def _is_o_path(fd: int) -> bool:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
    return bool(flags & 0o10000000)  # O_PATH


def probe_victim_proc(ctx: dict[str, Any]) -> str:
    v = ctx["victim"]
    got = []
    for what in ("mem", "maps", "environ", "auxv", "syscall", "pagemap"):
        try:
            with open(f"/proc/{v}/{what}", "rb") as f:
                f.read(64)
            got.append(what)
        except OSError:
            pass
    for what in ("fd", "map_files", "fdinfo"):
        try:
            if os.listdir(f"/proc/{v}/{what}"):
                got.append(what)
        except OSError:
            pass
    return f"open: /proc/{v}/{got}" if got else "blocked: none of mem, maps, environ, fd, map_files"


def probe_process_vm_readv(ctx: dict[str, Any]) -> str:
    buf = ctypes.create_string_buffer(8)
    local = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 8)
    remote = (ctypes.c_void_p * 2)(ctx["victim_address"], 8)  # an object the zygote made: at the same address there
    return _verdict(*_sys("process_vm_readv", ctx["victim"], local, 1, remote, 1, 0), "read the victim's memory")


def probe_shared_buffers(ctx: dict[str, Any]) -> str:
    """The victim's shared buffer (a memfd), by any name: /dev/shm, other processes' descriptors and mappings."""
    secret = bytes.fromhex(ctx["secret"])
    try:
        paths = [f"/dev/shm/{name}" for name in os.listdir("/dev/shm")]
    except OSError:  # (Landlock: not a folder a worker reads)
        paths = []
    try:
        pids = list(filter(str.isdigit, os.listdir("/proc")))
    except OSError:  # (Landlock: /proc/self only)
        pids = [str(ctx["victim"])]
    for pid in pids:
        for kind in ("fd", "map_files"):
            try:
                paths += [f"/proc/{pid}/{kind}/{name}" for name in os.listdir(f"/proc/{pid}/{kind}")]
            except OSError:
                continue
    reached = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                if secret in f.read(1 << 20):
                    reached.append(path)
        except OSError:
            pass
    return f"open: {reached}" if reached else "blocked: the victim's bytes found nowhere"


def probe_shrink_shared(ctx: dict[str, Any]) -> str:
    """Its own shared buffer's memory file (Python's mmap keeps a duplicate of the descriptor) shrunk: the daemon's
    mapping of it faults (SIGBUS: the whole daemon) at its next copy into the buffer."""
    shrunk, refused = [], []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:gpupool-shared"):
                continue
        except OSError:
            continue
        try:
            os.ftruncate(int(name), 0)
            shrunk.append(int(name))
        except OSError as exc:
            refused.append(errno.errorcode.get(exc.errno or 0))
    return f"open: shrank descriptor {shrunk}" if shrunk else f"blocked: {refused or 'no file to shrink'}"


def probe_environment(ctx: dict[str, Any]) -> str:
    """The daemon's credentials in the worker's environment (inherited through the zygote)."""
    found = [v for v in ctx["env_secrets"] if v in os.environ.values()]  # (its memory: the process's own)
    return f"open: {found}" if found else "blocked: no credential of the daemon's environment"


def probe_read_secret(ctx: dict[str, Any]) -> str:
    return _oserror(lambda: open(ctx["secret_file"], "rb").read(), "read a root-only file")


def probe_create_file(ctx: dict[str, Any]) -> str:
    return _oserror(lambda: os.open(os.path.join(ctx["writable_dir"], "made"), os.O_WRONLY | os.O_CREAT, 0o644))


def probe_truncate_readonly(ctx: dict[str, Any]) -> str:
    """O_RDONLY | O_TRUNC: Linux truncates a file the caller may write, whatever the access mode."""
    path = ctx["nobody_file"]
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_TRUNC))
    except OSError as exc:
        return f"blocked: {errno.errorcode.get(exc.errno or 0)}"
    size = os.stat(path).st_size
    return f"open: truncated to {size} bytes" if size == 0 else "blocked: size kept"


def probe_metadata(ctx: dict[str, Any]) -> str:
    """Changing a file the worker's user owns without opening it for writing: utime, fchmodat2, setxattr."""
    path = ctx["nobody_file"].encode()
    got = []
    ret, _ = _sys("utime", path, None)
    if ret == 0:
        got.append("utime")
    ret, _ = _sys("fchmodat2", -100, path, 0o666, 0)
    if ret == 0:
        got.append("fchmodat2")
    ret, _ = _sys("setxattr", path, b"user.gpupool", b"x", 1, 0)
    if ret == 0:
        got.append("setxattr")
    return f"open: {got}" if got else "blocked: utime, fchmodat2, setxattr"


def probe_stdio(ctx: dict[str, Any]) -> str:
    """The daemon's stderr, inherited: a log file the worker could truncate (permission was checked at its open)."""
    try:
        st = os.fstat(2)
    except OSError:
        return "blocked: no stderr"
    import stat

    if not stat.S_ISREG(st.st_mode):
        return "blocked: stderr is not a file"
    return _oserror(lambda: os.ftruncate(2, st.st_size), "ftruncate of the daemon's stderr file")


def probe_flood_stderr(ctx: dict[str, Any]) -> str:
    """Forged lines of the daemon's log, terminal escapes and megabytes written to stderr (the daemon's, until
    round 38): the test reads what reached the daemon's stderr."""
    forged = b"2026-01-01 00:00:00 gpupool-daemon INFO gpupool.server.daemon: forged line\r\x1b[2J\x1b]0;title\x07\n"
    written = 0
    try:
        for _ in range(ctx["flood_bytes"] // len(forged)):
            written += os.write(2, forged)
    except OSError as exc:
        return f"blocked: {errno.errorcode.get(exc.errno or 0)} after {written} bytes"
    return f"wrote {written} bytes"


def probe_sockets(ctx: dict[str, Any]) -> str:
    got = []
    for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_NETLINK):
        try:
            socket.socket(family, socket.SOCK_DGRAM).close()
            got.append(str(family))
        except OSError:
            pass
    return f"open: {got}" if got else "blocked: unix, inet, netlink"


def probe_read_daemon_files(ctx: dict[str, Any]) -> str:
    """Files of the daemon's user (its TLS key, its API token file) that a worker keeping that user may read by
    its permissions (a non-root daemon's worker)."""
    got = []
    for path in ctx["daemon_files"]:
        try:
            with open(path, "rb") as f:
                f.read(64)
            got.append(path)
        except OSError:
            pass
    return f"open: read {got}" if got else "blocked: none of the daemon's files"


def probe_write_tmp(ctx: dict[str, Any]) -> str:
    """A file made in /tmp (the host's shared scratch: other tenants' and the daemon's files live there)."""
    path = os.path.join(ctx.get("tmp", "/tmp"), f"gpupool-worker-{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return f"blocked: {errno.errorcode.get(exc.errno or 0)}"
    os.write(fd, b"written by a worker")
    os.close(fd)
    os.unlink(path)
    return f"open: made {path}"


def probe_connect_loopback(ctx: dict[str, Any]) -> str:
    """A TCP connection to a loopback port (the daemon's own ports, the scheduler, any local service)."""
    try:
        with socket.create_connection(("127.0.0.1", ctx["port"]), timeout=5) as conn:
            conn.sendall(b"hello from a worker")
    except OSError as exc:
        return f"blocked: {errno.errorcode.get(exc.errno or 0, exc)}"
    return f"open: connected to 127.0.0.1:{ctx['port']}"


def probe_survey(ctx: dict[str, Any]) -> str:
    """What a worker reads, lists and writes of the host (for reports: `open` lists each path it reached)."""
    reached = []
    for path in ctx["survey_read"]:
        try:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                with open(path, "rb") as f:
                    f.read(16)
            reached.append(f"read {path}")
        except OSError:
            pass
    for folder in ctx["survey_write"]:
        path = os.path.join(folder, f".gpupool-survey-{os.getpid()}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(path)
            reached.append(f"write {folder}")
        except OSError:
            pass
    return f"open: {reached}" if reached else "blocked: nothing of the survey"


def probe_cuda_work(ctx: dict[str, Any]) -> str:
    """Not an attack: what a real GPU's worker loads lazily once confined (Landlock: the folders of the libraries it
    had mapped) still loads: cuDNN's engines (a convolution), NVRTC (a jiterator op), cuBLASLt (addmm with a bias),
    the driver's memory query, NVML. "open: ..." names each that ran, "blocked: ..." the first that failed."""
    import torch

    dev = torch.device("cuda", 0)
    x = torch.randn(2, 3, 16, 16, device=dev)
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("conv2d", lambda: torch.nn.functional.conv2d(x, torch.randn(4, 3, 3, 3, device=dev)).sum().item()),
        ("jiterator", lambda: torch.special.bessel_j0(x).sum().item()),
        (
            "addmm",
            lambda: (
                torch.addmm(torch.randn(8, device=dev), torch.randn(4, 8, device=dev), torch.randn(8, 8, device=dev))
                .sum()
                .item()
            ),
        ),  # fmt: skip
        ("mem_get_info", lambda: torch.cuda.mem_get_info(dev)),
        ("device_count", torch.cuda.device_count),
    ]
    ran = []
    for name, fn in steps:
        try:
            fn()
        except Exception as exc:
            return f"blocked: {name}: {type(exc).__name__}: {str(exc)[:300]}"
        ran.append(name)
    return f"open: {ran}"


def probe_gpu_isolation(ctx: dict[str, Any]) -> str:
    """Which GPUs a confined real GPU's worker sees and may open (round 40): "report: " and JSON of its
    CUDA_VISIBLE_DEVICES, CUDA's device count and its device 0's UUID, the NVIDIA files it holds open, and which of the
    host's GPU device files (/dev/nvidiaN: found by stat, which Landlock leaves alone) a read-only open (what seccomp
    lets through) reaches."""
    import torch
    from gpupool.server import landlock

    props = torch.cuda.get_device_properties(0)
    got: dict[str, Any] = {
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device_count": torch.cuda.device_count(),
        "uuid": str(getattr(props, "uuid", "")),
        "held": landlock.nvidia_files(),
        "opened": [],
        "refused": [],
    }
    for minor in range(256):
        path = f"/dev/nvidia{minor}"
        if not os.path.exists(path):
            continue
        try:
            os.close(os.open(path, os.O_RDONLY))
            got["opened"].append(path)
        except OSError as exc:
            got["refused"].append(f"{path} {errno.errorcode.get(exc.errno or 0, exc.errno)}")
    # (round 41) which GPUs' folders of the driver's /proc and of /sys it reads (ctx: every GPU's PCI address), and
    # which of the host's MIG capability files (ctx: their names in /dev/nvidia-caps) it opens
    got["driver_read"], got["sys_read"], got["caps_opened"] = [], [], []
    for pci in ctx.get("gpu_pcis", []):
        for key, path in (("driver_read", f"/proc/driver/nvidia/gpus/{pci}/information"),
                          ("sys_read", f"/sys/bus/pci/devices/{pci}/numa_node")):  # fmt: skip
            try:
                with open(path, "rb") as f:
                    f.read(16)
                got[key].append(pci)
            except OSError:
                pass
    for name in ctx.get("caps", []):
        try:
            os.close(os.open(f"/dev/nvidia-caps/{name}", os.O_RDONLY))
            got["caps_opened"].append(name)
        except OSError:
            pass
    return "report: " + json.dumps(got)


def probe_hang(ctx: dict[str, Any]) -> str:
    """Not a probe: a worker that never reads its session socket again (a tenant's code blocked in a call), so
    nothing but a signal ends it. Reports nothing."""
    import time

    while True:
        time.sleep(3600)


def probe_abstract_unix(ctx: dict[str, Any]) -> str:
    """The host's abstract unix socket `ctx["abstract"]` (a service that trusts local peers)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect("\0" + ctx["abstract"])
    except OSError as exc:
        return f"blocked: {errno.errorcode.get(exc.errno or 0, exc)}"
    return "open: connected to the host's abstract unix socket"


def probe_socket_families(ctx: dict[str, Any]) -> str:
    """A worker granted network (collectives): sockets other than TCP over IPv4 and IPv6, and the host's abstract
    unix socket `ctx["abstract"]` (a service that trusts local peers)."""
    got = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect("\0" + ctx["abstract"])
            got.append("connected to the host's abstract unix socket")
    except OSError:
        pass
    for family, kind, proto in ((socket.AF_NETLINK, socket.SOCK_RAW, 4), (38, socket.SOCK_SEQPACKET, 0),
                                (socket.AF_PACKET, 3, 0)):  # fmt: skip
        try:
            socket.socket(family, kind, proto).close()
            got.append(f"{family} protocol {proto}")  # (netlink 4: sock_diag, every socket of the host)
        except OSError:
            pass
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except OSError as exc:
        got.append(f"no TCP socket either ({exc})")  # the grant's whole point: refused would be a regression
    return f"open: {got}" if got else "blocked: unix, netlink's sock_diag, AF_ALG, packet (TCP kept)"


def probe_io_uring(ctx: dict[str, Any]) -> str:
    params = ctypes.create_string_buffer(120)
    return _verdict(*_sys("io_uring_setup", 4, params), "an io_uring (opens files and sockets past seccomp)")


def probe_aio(ctx: dict[str, Any]) -> str:
    handle = ctypes.c_ulong(0)
    return _verdict(*_sys("io_setup", 1, ctypes.byref(handle)), "an AIO context (the host's fs.aio-max-nr)")


def probe_unreviewed_calls(ctx: dict[str, Any]) -> str:
    """Calls newer than the filter's review: 469 file_setattr (Linux 6.17: changes a file's attributes), 463
    setxattrat. ENOSYS from the filter, whatever the arguments; another errno means the kernel ran it."""
    got = []
    for nr in (463, 469):
        ctypes.set_errno(0)
        ret = _libc.syscall(ctypes.c_long(nr), -1, None, None, 0, 0)
        if ret >= 0 or ctypes.get_errno() != errno.ENOSYS:
            got.append(f"{nr}: {errno.errorcode.get(ctypes.get_errno(), ret)}")
    return f"open: the kernel ran {got}" if got else "blocked: ENOSYS"


def probe_kernel_interfaces(ctx: dict[str, Any]) -> str:
    got = []
    attr = ctypes.create_string_buffer(128)
    if _sys("bpf", 0, attr, 128)[0] >= 0:
        got.append("bpf")
    if _sys("userfaultfd", 0)[0] >= 0:
        got.append("userfaultfd")
    perf = ctypes.create_string_buffer(128)
    ctypes.c_uint32.from_buffer(perf, 0).value = 1  # PERF_TYPE_SOFTWARE, config 0: cpu clock
    ctypes.c_uint32.from_buffer(perf, 4).value = 128
    if _sys("perf_event_open", perf, 0, -1, -1, 0)[0] >= 0:
        got.append("perf_event_open")
    if _sys("keyctl", 0, -4, 0)[0] >= 0:  # KEYCTL_GET_KEYRING_ID of the user keyring
        got.append("keyctl")
    if _sys("unshare", 0x10000000)[0] >= 0:  # CLONE_NEWUSER
        got.append("unshare")
    if _sys("clone", 0x10000000 | signal.SIGCHLD, None, None, None, None)[0] >= 0:
        got.append("clone(CLONE_NEWUSER)")  # (a child would be running: never reached when denied)
    if _sys("mount", b"none", b"/tmp", b"tmpfs", 0, None)[0] >= 0:
        got.append("mount")
    if _sys("execveat", -100, b"/bin/true", None, None, 0)[0] >= 0:
        got.append("execveat")
    if _sys("memfd_secret", 0)[0] >= 0:
        got.append("memfd_secret")
    if _sys("fanotify_init", 0, 0)[0] >= 0:
        got.append("fanotify_init")
    try:
        os.memfd_create("x")
        got.append("memfd_create")
    except OSError:
        pass
    return f"open: {got}" if got else "blocked: all"


def probe_signal_victim(ctx: dict[str, Any]) -> str:
    """Signal 0 (a permission check that harms nothing) to the victim, by every call that takes a pid."""
    v = ctx["victim"]
    got = []
    try:
        os.kill(v, 0)
        got.append("kill")
    except OSError:
        pass
    info = ctypes.create_string_buffer(128)
    ctypes.c_int.from_buffer(info, 8).value = -1  # si_code SI_QUEUE
    if _sys("rt_sigqueueinfo", v, 0, info)[0] == 0:
        got.append("rt_sigqueueinfo")
    if _sys("rt_tgsigqueueinfo", v, v, 0, info)[0] == 0:
        got.append("rt_tgsigqueueinfo")
    if _sys("ptrace", 16, v, None, None)[0] == 0:  # PTRACE_ATTACH
        got.append("ptrace")
    return f"open: {got}" if got else "blocked: kill, rt_sigqueueinfo, rt_tgsigqueueinfo, ptrace"


def sigio_kill(pid: int) -> None:
    """SIGKILL to `pid` by I/O: a pipe's owner (F_SETOWN) gets its F_SETSIG signal when the pipe is written."""
    import fcntl

    r, w = os.pipe()
    fcntl.fcntl(r, fcntl.F_SETOWN, pid)
    fcntl.fcntl(r, 10, signal.SIGKILL)  # F_SETSIG
    fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)
    os.write(w, b"x")


def probe_sigio_kill(ctx: dict[str, Any]) -> str:
    """SIGKILL to the sacrificial victim by a pipe's SIGIO owner (`sigio_kill`): did it die?"""
    v = ctx["sacrificial"]
    try:
        sigio_kill(v)
    except OSError as exc:
        return f"blocked: {errno.errorcode.get(exc.errno or 0)}"
    time.sleep(0.2)  # (the kernel checks the owner's users when it sends: a refused signal is dropped)
    try:
        with open(f"/proc/{v}/stat") as f:
            dead = f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:  # gone, or hidden (a private /proc, hidepid): kill(0) tells them apart (ESRCH: gone)
        try:
            os.kill(v, 0)
            dead = False
        except ProcessLookupError:
            dead = True
        except PermissionError:
            dead = False
    return "open: SIGKILL sent by a pipe's owner" if dead else "blocked: the owner's signal was not delivered"


def probe_other_process_settings(ctx: dict[str, Any]) -> str:
    """What a same-uid process may change of the victim (each set to what it already is: no harm done)."""
    v = ctx["victim"]
    got = []
    limit = (ctypes.c_uint64 * 2)()
    if _sys("prlimit64", v, resource.RLIMIT_NOFILE, None, limit)[0] == 0:
        new = (ctypes.c_uint64 * 2)(limit[0], limit[1])
        if _sys("prlimit64", v, resource.RLIMIT_NOFILE, new, None)[0] == 0:
            got.append("prlimit64")
    try:
        os.setpriority(os.PRIO_PROCESS, v, os.getpriority(os.PRIO_PROCESS, v))
        got.append("setpriority")
    except OSError:
        pass
    try:
        os.sched_setaffinity(v, os.sched_getaffinity(v))
        got.append("sched_setaffinity")
    except OSError:
        pass
    try:
        os.sched_setscheduler(v, os.SCHED_OTHER, os.sched_param(0))
        got.append("sched_setscheduler")
    except OSError:
        pass
    prio, _ = _sys("ioprio_get", 1, v)
    if prio >= 0 and _sys("ioprio_set", 1, v, prio)[0] == 0:
        got.append("ioprio_set")
    return f"open: {got}" if got else "blocked: prlimit64, setpriority, sched_set*, ioprio_set"


def probe_ipc(ctx: dict[str, Any]) -> str:
    """System V IPC and POSIX message queues: objects that outlive the worker, owned by its (shared) user."""
    got = []
    shm, _ = _sys("shmget", 0, 1 << 20, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    if shm >= 0:
        got.append("shmget")
        _sys("shmctl", shm, 0, None)  # IPC_RMID
    msg, _ = _sys("msgget", 0, 0o1000 | 0o600)
    if msg >= 0:
        got.append("msgget")
        _sys("msgctl", msg, 0, None)
    sem, _ = _sys("semget", 0, 1, 0o1000 | 0o600)
    if sem >= 0:
        got.append("semget")
        _sys("semctl", sem, 0, 0, None)
    mq, _ = _sys("mq_open", b"gpupool-probe", os.O_RDWR | os.O_CREAT, 0o600, None)
    if mq >= 0:
        got.append("mq_open")
        os.close(mq)
        _sys("mq_unlink", b"gpupool-probe")
    return f"open: {got}" if got else "blocked: shmget, msgget, semget, mq_open"


def probe_locks(ctx: dict[str, Any]) -> str:
    """Locks on a file the worker may only read (a lock another process of the host may need)."""
    import fcntl

    got = []
    try:
        fd = os.open(ctx["readable_file"], os.O_RDONLY)
    except OSError:  # (Landlock: not a file a worker reads) a file of the host it reads still
        fd = os.open("/etc/localtime", os.O_RDONLY)
    lk = fcntl.lockf
    attempts: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        ("flock", lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), lambda: fcntl.flock(fd, fcntl.LOCK_UN)),
        ("fcntl read lock", lambda: lk(fd, fcntl.LOCK_SH | fcntl.LOCK_NB), lambda: lk(fd, fcntl.LOCK_UN)),
        ("lease", lambda: fcntl.fcntl(fd, 1024, fcntl.F_RDLCK), lambda: fcntl.fcntl(fd, 1024, fcntl.F_UNLCK)),
    ]  # fmt: skip
    try:
        for name, take, give in attempts:
            try:
                take()
            except OSError:
                continue
            got.append(name)
            give()
    finally:
        os.close(fd)
    return f"open: {got}" if got else "blocked: flock, fcntl locks, leases"


def probe_shared_anonymous(ctx: dict[str, Any]) -> str:
    """Shared anonymous memory is outside RLIMIT_DATA (the worker's host memory cap on a fake GPU)."""
    size = ctx["shared_anon_bytes"]
    try:
        m = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        return f"blocked: {errno.errorcode.get(exc.errno or 0)}"
    try:
        for at in range(0, size, 4096):
            m[at] = 1
    finally:
        m.close()
    return f"open: {size} bytes of shared anonymous memory touched"


def probe_threads(ctx: dict[str, Any]) -> str:
    """Tasks a worker may start (threads are allowed): RLIMIT_NPROC bounds them, counted per user."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NPROC)
    want = ctx["threads"]
    threading.stack_size(64 * 1024)  # (an attacker's own clone() needs no stack at all)
    stop = threading.Event()
    started = 0
    threads = []
    try:
        for _ in range(want):
            t = threading.Thread(target=stop.wait)
            t.start()
            threads.append(t)
            started += 1
    except RuntimeError:
        pass
    finally:
        stop.set()
        for t in threads:
            t.join()
    if started >= want:
        return f"open: {started} threads started (RLIMIT_NPROC {soft})"
    return f"blocked: {started} of {want} threads (RLIMIT_NPROC {soft})"


MEMSCAN = "attack-memscan-"  # a lease id: scan for secrets that start with the prefixes after it ("."-separated)


def memory_secrets(prefixes: list[str], length: int = 24) -> list[str]:
    """Strings of `length` URL-safe characters (a session id: secrets.token_urlsafe(18)) that start with one of
    `prefixes`, found in the worker's own writable memory: its heap and anonymous mappings, which a forked worker
    inherits from the zygote (whatever the zygote was sent for earlier workers, freed or not). Its own memory needs
    no permission at all: no sandbox can refuse this read."""
    import re

    found: set[str] = set()
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    for region in regions:
        if "rw" not in region[1] or (len(region) > 5 and region[5] != "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in region[0].split("-"))
        if hi - lo > 1 << 30:
            continue
        data = ctypes.string_at(lo, hi - lo)
        for prefix in prefixes:
            rest = length - len(prefix)
            found.update(
                m.decode() for m in re.findall(re.escape(prefix.encode()) + rb"[A-Za-z0-9_-]{%d}" % rest, data)
            )
    return sorted(found)


def rampage(sock: socket.socket) -> list[str]:
    """What a worker whose lease id starts with `attack-rampage` does once confined, in a real daemon: every way it
    has to end or cripple its sibling workers (the zygote's other children: never another process of the host),
    then junk on its own session socket where the daemon waits for a result. What reached a sibling."""

    me, parent = os.getpid(), os.getppid()
    reached = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if pid == me or ppid != parent:
            continue
        limit = (ctypes.c_uint64 * 2)(0, 0)
        if _sys("prlimit64", pid, resource.RLIMIT_NOFILE, limit, None)[0] == 0:
            reached.append(f"{pid}: prlimit64")
        try:
            sigio_kill(pid)
        except OSError:
            pass
        info = ctypes.create_string_buffer(128)
        ctypes.c_int.from_buffer(info, 8).value = -1
        if _sys("rt_sigqueueinfo", pid, signal.SIGKILL, info)[0] == 0:
            reached.append(f"{pid}: rt_sigqueueinfo")
        try:
            os.kill(pid, signal.SIGKILL)
            reached.append(f"{pid}: kill")
        except OSError:
            pass
    sock.sendall(b"\xff\xff\xff\xff" + os.urandom(64))  # a result nobody asked for, of an impossible length
    return reached


def probe_bind_range(ctx: dict[str, Any]) -> str:
    """A worker granted network binds every port of `ctx["range"]` (LOW, HIGH: --collective-ports) it can, all at
    once (so that no other worker's group could listen there): the ports it got, and the errors of the others."""
    held, refused = [], {}
    try:
        for port in range(ctx["range"][0], ctx["range"][1] + 1):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
                held.append(s)
            except OSError as exc:
                s.close()
                name = errno.errorcode.get(exc.errno or 0, str(exc))
                refused[name] = refused.get(name, 0) + 1
        return "report: " + json.dumps({"bound": [s.getsockname()[1] for s in held], "refused": refused})
    finally:
        for s in held:
            s.close()


def probe_udp(ctx: dict[str, Any]) -> str:
    """A worker granted network: a UDP datagram to the host's port `ctx["udp_port"]` (a name server, syslog, any
    service of any host), an ICMP ping socket, and whether its name lookups still work ("localhost", and the resolver's
    options: TCP, `use-vc`)."""
    got = {}
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello from a worker", ("127.0.0.1", ctx["udp_port"]))
        got["udp"] = "sent"
    except OSError as exc:
        got["udp"] = f"blocked {errno.errorcode.get(exc.errno or 0, exc)}"
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
        got["ping"] = "open"
    except OSError as exc:
        got["ping"] = f"blocked {errno.errorcode.get(exc.errno or 0, exc)}"
    try:
        got["localhost"] = sorted({a[4][0] for a in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)})
    except OSError as exc:
        got["localhost"] = f"failed {exc}"
    got["RES_OPTIONS"] = os.environ.get("RES_OPTIONS", "")
    return "report: " + json.dumps(got)


def probe_net_escapes(ctx: dict[str, Any]) -> str:
    """A worker granted network, past its TCP-only seccomp rule and its Landlock TCP ports: a stream socket of another
    protocol (MPTCP, SCTP: Landlock's TCP rules are TCP's only) connecting to the host's TCP port `ctx["tcp_port"]`
    outside --collective-ports; unix sockets by socketpair binding the abstract name `ctx["squat"]` (gpupool's names
    that hold the collective ports) and sending a datagram to the unix socket file `ctx["unix_path"]`; and the unix
    sockets it inherited binding such names. What it reached, as a JSON report."""
    got: dict[str, str] = {}
    inherited = []  # (first: the sockets it was given)
    for fd in range(3, 256):
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if s.family == socket.AF_UNIX:
                try:
                    s.bind("\0" + ctx["squat"] + f":{fd}")
                    inherited.append(f"{fd} bound")
                except OSError as exc:
                    inherited.append(f"{fd} {errno.errorcode.get(exc.errno or 0, exc)}")
        finally:
            s.detach()
    got["inherited"] = ", ".join(inherited)
    for name, proto in (("mptcp", 262), ("sctp", 132)):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto) as s:
                s.settimeout(2)
                s.connect(("127.0.0.1", ctx["tcp_port"]))
                got[name] = "connected"
        except OSError as exc:
            got[name] = f"blocked {errno.errorcode.get(exc.errno or 0, exc)}"
    held = []
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        held += [a, b]
        a.bind("\0" + ctx["squat"])
        got["socketpair_bind"] = "bound"
    except OSError as exc:
        got["socketpair_bind"] = f"blocked {errno.errorcode.get(exc.errno or 0, exc)}"
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        held += [a, b]
        a.sendto(b"hello from a worker", ctx["unix_path"])
        got["unix_datagram"] = "sent"
    except OSError as exc:
        got["unix_datagram"] = f"blocked {errno.errorcode.get(exc.errno or 0, exc)}"
    for s in held:
        s.close()
    return "report: " + json.dumps(got)


PROBES: dict[str, Callable[[dict[str, Any]], str]] = {
    name[len("probe_") :]: fn for name, fn in globals().items() if name.startswith("probe_") and callable(fn)
}


def run_probes(names: list[str], ctx: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = PROBES[name](ctx)
        except Exception as exc:  # a probe's own bug: say so rather than pass
            out[name] = f"error: {type(exc).__name__}: {exc}"
    return out


def read_report(sock: socket.socket, timeout: float = 120.0) -> dict[str, str]:
    """The test's side: what each probe of an attacking worker got (its one JSON line on the session socket)."""
    sock.settimeout(timeout)
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "the attacking worker died"
        line += chunk
    return dict(json.loads(line))


# ---- the zygote program ----

VICTIM_OBJECT = bytearray(b"an object of the zygote, at the same address in every worker")


def _install() -> None:
    from gpupool.server import worker

    real_main, real_settle = worker.worker_main, worker.settle_gc
    current: dict[str, Any] = {}

    def worker_main(sock: socket.socket, progress_fd: int, spec: Any) -> int:
        current["sock"], current["spec"] = sock, spec
        return real_main(sock, progress_fd, spec)

    def settle_gc() -> None:  # worker_main's last step before it serves: confined, its shared buffer mapped
        real_settle()
        spec = current["spec"]
        if spec.lease_id.startswith("attack-rampage"):
            rampage(current["sock"])
        if spec.lease_id.startswith(MEMSCAN):  # what it found, on its stderr (the zygote forwards it to the daemon's)
            found = memory_secrets(spec.lease_id[len(MEMSCAN) :].split("."))
            print(f"memscan {os.getpid()}: {json.dumps(found)}", file=sys.stderr, flush=True)
        if spec.session_id.startswith(PREFIX):
            order = json.loads(spec.session_id[len(PREFIX) :])
            ctx = {**order["ctx"], "own_socket": current["sock"].fileno(), "victim_address": id(VICTIM_OBJECT)}
            got = run_probes(order["probes"], ctx)
            current["sock"].sendall(json.dumps(got).encode() + b"\n")

    worker.worker_main = worker_main
    worker.settle_gc = settle_gc


if __name__ == "__main__":
    from gpupool.server import zygote

    _install()
    if len(sys.argv) == 4 and sys.argv[1] == "--stderr":  # where the zygote's stderr (the daemon's) goes
        log = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(log, 2)
        os.close(log)
    sys.argv = [sys.argv[0], sys.argv[-1]]
    zygote.main()
