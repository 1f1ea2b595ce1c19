"""Landlock for session workers: the kernel's unprivileged access control (Linux 5.13+), applied by every worker
after its user drop and before seccomp (server/sandbox.py `apply`), on root and non-root daemons alike.

Until round 39 a non-root daemon's workers ran as the daemon's own user, so code a tenant ran in one (a memory-safety
bug in a kernel) could read whatever that user can: the daemon's TLS key and API token file, the scheduler's files,
the user's home, other tenants' checkpoints on disk. A root daemon's workers (`nobody`, or a uid of their own) could
still read every world-readable file of the host. Seccomp cannot tell one path from another; Landlock can. A
confined worker may:

- read (files and directory listings) only Python's installation (its prefixes' standard library and site-packages),
  the packages it has imported (`sys.modules`: an editable install's source folders), the folders of the shared
  libraries it has mapped (torch's, the CUDA runtime's and driver's on a GPU host: read from /proc/self/maps, so
  nothing is hard-coded), a few files of /etc that the C library reads (ld.so.cache, localtime; for a worker granted
  network name lookup's, and under `--collectives gloo` the interfaces and PCI devices of /sys that gloo lists),
  /proc/self (less `net`, the host's connections: round 41; since round 42 for a worker granted network too), the
  CPU list and THP settings of /sys, and on a real GPU the
  driver's control files and its own GPU's file only (read, write, ioctl: `gpu_devices`; round 40: until then every
  /dev/nvidia* of the host, another tenant's GPU included), of /proc/driver/nvidia, /sys and /dev/nvidia-caps its own
  GPU's entries only (`gpu_paths`; round 41: until then every GPU's) and the CUDA JIT cache (read);
- write nowhere (the profile and audit files of GPUPOOL_WORKER_PROFILE and GPUPOOL_OP_AUDIT are opened before);
  /dev/null is writable;
- execute nothing; make, remove, rename, link or truncate nothing;
- with ABI 4 (Linux 6.7): bind or connect no TCP port unless its lease grants network (collectives), and then
  (round 42) bind and connect only the ports of the daemon's `--collective-ports` range (its group's store, secure
  hub and store relay; its peers' alike) and connect to port 53 (name lookups over TCP); under `--collectives gloo`
  it connects anywhere (gloo's pairs dial the ports their peers' kernels picked) and binds that range or a port the
  kernel picks (port 0); until round 42 such a worker bound and connected to any port (the daemon's and the
  scheduler's loopback ports included);
- with ABI 6 (Linux 6.12): signal no process and connect to no abstract unix socket outside its own domain.

Best effort by ABI: a kernel without Landlock, or an older ABI, keeps what it has and says what is missing (the
daemon logs it once at its start: `describe`); `--landlock off` is the operator's opt-out. What Landlock cannot
cover: stat() and path existence, already-open descriptors (the session socket, the shared buffer), threads started
before `restrict` (a real GPU's CUDA threads: Landlock confines the calling thread and what it starts), UDP and
other socket families (seccomp's), a `listen()` on a socket never bound (the kernel picks its port: ABI 7 does not
check it), and on a kernel before 6.12 signals and abstract sockets.
"""

from __future__ import annotations

import ctypes
import os
import re
import stat
import sys
import sysconfig
from dataclasses import dataclass

# system call numbers (the same on every architecture: they were added after the tables were unified)
NR_CREATE_RULESET, NR_ADD_RULE, NR_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
DNS_PORT = 53  # a network worker's name lookups: glibc's resolver retries over TCP when a UDP answer is truncated

# filesystem rights, by the ABI that added them
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # EXECUTE ... MAKE_SYM
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # what a rule on a file may name
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2  # ABI 6

READ = FS_READ_FILE | FS_READ_DIR
DEVICE = FS_READ_FILE | FS_WRITE_FILE | FS_IOCTL_DEV

# What each ABI below the one this module knows (6: scopes) leaves undone.
MISSING_BELOW = {
    2: "renames and links across folders (ABI 2)",
    3: "truncation (ABI 3)",
    4: "TCP bind and connect (ABI 4)",
    5: "device ioctls (ABI 5)",
    6: "signals and abstract unix sockets outside the worker (ABI 6)",
}

ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
# A worker granted network: name lookup's files (getaddrinfo of a collective store's host); under `--collectives
# gloo` the interfaces and PCI devices gloo's transport lists when it starts (gloo/common/linux.cc opens
# /sys/bus/pci/devices and follows /sys/class/net's links into /sys/devices: refused, every gloo group failed to
# form). The secure links read none of /sys (until round 42 every network worker read all of /sys/devices).
NETWORK_READ = ("/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf",
                "/etc/services", "/etc/protocols")  # fmt: skip
GLOO_READ = ("/sys/class/net", "/sys/bus/pci", "/sys/devices")
SYS_READ = ("/sys/devices/system/cpu", "/sys/kernel/mm/transparent_hugepage", "/proc/sys/vm/overcommit_memory")
DEVICES_READ = ("/dev/urandom", "/dev/random", "/dev/zero")
# A real GPU's worker: the PCI bus's folder (its devices are links: only its own GPU's target is granted) and the
# host's NUMA nodes; its own GPU's folders of /sys and of the driver's /proc, and the MIG capability files it holds,
# come from `gpu_paths`
GPU_READ = ("bus/pci", "devices/system/node")  # (beneath GpuLayout.sys)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]  # fmt: skip


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def abi() -> int:
    """The kernel's Landlock ABI version (0: none, or switched off at boot)."""
    ret = _libc.syscall(ctypes.c_long(NR_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return int(ret) if ret > 0 else 0


def describe(version: int) -> str:
    """What a worker lacks on this kernel ("" where nothing is): for the daemon's one warning at start."""
    if version <= 0:
        return (
            "this kernel has no Landlock: session workers may read every file their user may (the host's connections "
            "in /proc/self/net, every GPU's driver entries, a same-user daemon's /proc/PID included)"
        )
    lacking = [what for at, what in MISSING_BELOW.items() if version < at]
    return f"Landlock ABI {version}: session workers lack its confinement of " + ", ".join(lacking) if lacking else ""


def _prefix_paths() -> set[str]:
    """Python's installation: each prefix's standard library and site-packages."""
    out: set[str] = set()
    for scheme_vars in ({"base": sys.prefix, "platbase": sys.exec_prefix},
                        {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):  # fmt: skip
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            try:
                out.add(sysconfig.get_path(key, vars=scheme_vars))
            except KeyError:
                continue
    out.update(p for p in sys.path if p and os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages"))
    out.update(p for p in sys.path if p.endswith(".zip"))
    return out


def _module_paths() -> set[str]:
    """What the imported modules came from: each package's folders, each plain module's file (an editable install's
    source tree, a folder of sys.path beside the installation)."""
    out: set[str] = set()
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if paths is not None:
            try:
                out.update(p for p in paths if isinstance(p, str) and p.startswith("/"))
            except TypeError:  # a namespace path that cannot be iterated now
                pass
            continue
        where = getattr(module, "__file__", None)
        if isinstance(where, str) and where.startswith("/"):
            out.add(where)
    return out


def _world_writable(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IWOTH)
    except OSError:
        return True


def mapped_paths() -> set[str]:
    """The folders of the files this process has mapped (its shared libraries: torch's, OpenBLAS's, the C++
    runtime's; on a GPU, CUDA's and the driver's), so that what they open later beside them (a library dlopen'd
    lazily: cuDNN's engines, NVRTC's builtins, OpenSSL's) loads. A world-writable folder (/tmp, /dev/shm) is never
    named whole: the file itself is."""
    out: set[str] = set()
    try:
        with open("/proc/self/maps") as maps:
            files = {line.split(maxsplit=5)[5].rstrip("\n") for line in maps if line.count(" ") >= 5 and "/" in line}
    except OSError:
        return out
    for path in files:
        if not path.startswith("/") or path.endswith(" (deleted)") or path.startswith(("/dev/", "/proc/", "/memfd:")):
            continue
        folder = os.path.dirname(path)
        out.add(path if _world_writable(folder) else folder)
    return out


def _minimal(paths: set[str]) -> list[str]:
    """`paths` that exist, less those beneath another (one rule covers its whole tree)."""

    def outermost(candidates: set[str]) -> list[str]:
        out: list[str] = []
        for p in sorted(candidates):
            if out and (p == out[-1] or p.startswith(out[-1].rstrip("/") + "/")):
                continue
            out.append(p)
        return out

    # by name first (a module's file beneath site-packages: no system call), then as the kernel resolves them
    return outermost({os.path.realpath(p) for p in outermost(paths) if os.path.exists(p)})


_base: list[str] | None = None


def read_paths() -> list[str]:
    """What every worker may read (computed once, in the warm zygote, and inherited by each worker it forks)."""
    global _base
    if _base is None:
        paths = _prefix_paths() | _module_paths() | mapped_paths()
        paths.update(ETC_FILES + SYS_READ + DEVICES_READ)
        _base = _minimal(paths)
    return _base


@dataclass(frozen=True)
class GpuLayout:
    """Where the NVIDIA driver keeps what `gpu_devices` reads: its device files, its /proc folder (a folder per GPU,
    named by PCI address, whose `information` names the GPU's UUID and its device file's minor), and this process's
    descriptors. A parameter so that tests lay out a tree like the driver's (tests/unit/test_gpu_isolation.py)."""

    dev: str = "/dev"
    driver: str = "/proc/driver/nvidia"
    fds: str = "/proc/self/fd"
    sys: str = "/sys"  # its PCI devices (bus/pci/devices/<address>: a link into devices/)


DRIVER = GpuLayout()
# the driver's files that are no GPU's own: every CUDA process opens nvidiactl and nvidia-uvm; nvidia-uvm-tools
# (UVM's event queues: CUDA opens it for its tools' support) and nvidia-modeset only where the worker's CUDA context
# opened them (round 41: until then granted wherever the host has them)
CONTROL_NODES = ("nvidiactl", "nvidia-uvm")
HELD_CONTROL_NODES = ("nvidia-uvm-tools", "nvidia-modeset")
_GPU_NODE = re.compile(r"nvidia(\d+)")


def _same_uuid(a: str, b: str) -> bool:
    def bare(u: str) -> str:
        u = u.strip().lower()
        return u[4:] if u.startswith("gpu-") else u

    return bool(a.strip()) and bare(a) == bare(b)


def gpu_minor(uuid: str, pci: str = "", layout: GpuLayout = DRIVER) -> int | None:
    """The minor of the device file (/dev/nvidiaN) of the GPU whose UUID is `uuid` (or, without a match by UUID,
    whose PCI address is `pci`, "0000:18:00.0"), from the driver's /proc/driver/nvidia/gpus/*/information ("GPU
    UUID:", "Bus Location:", "Device Minor:"); None where no GPU there matches (or the folder cannot be read)."""
    own = own_gpu(uuid, pci, layout)
    return own[1] if own else None


def own_gpu(uuid: str, pci: str = "", layout: GpuLayout = DRIVER) -> tuple[str, int] | None:
    """(its folder's name in the driver's /proc/driver/nvidia/gpus: its PCI address, its device file's minor) of
    the GPU `gpu_minor` finds; None where none matches."""
    root = os.path.join(layout.driver, "gpus")
    try:
        folders = sorted(os.listdir(root))
    except OSError:
        return None
    by_pci: tuple[str, int] | None = None
    for folder in folders:
        fields: dict[str, str] = {}
        try:
            with open(os.path.join(root, folder, "information")) as f:
                for line in f:
                    key, sep, value = line.partition(":")
                    if sep:
                        fields[key.strip().lower()] = value.strip()
        except OSError:
            continue
        try:
            minor = int(fields.get("device minor", ""))
        except ValueError:
            continue
        if _same_uuid(uuid, fields.get("gpu uuid", "")):
            return folder, minor
        if pci and pci.lower() in (folder.lower(), fields.get("bus location", "").lower()):
            by_pci = folder, minor
    return by_pci


def nvidia_files(layout: GpuLayout = DRIVER) -> list[str]:
    """The NVIDIA device files (/dev/nvidia*) this process holds open (its descriptors' targets)."""
    out: set[str] = set()
    try:
        fds = os.listdir(layout.fds)
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(os.path.join(layout.fds, fd))
        except OSError:
            continue
        if target.startswith(os.path.join(layout.dev, "nvidia")):
            out.add(target)
    return sorted(out)


def held_gpu_nodes(layout: GpuLayout = DRIVER) -> list[str]:
    """The GPU device files (/dev/nvidiaN, not the control files) this process holds open: after a CUDA context
    exists, its own GPU's (the driver opened it); Landlock narrows none of them."""
    dev = layout.dev.rstrip("/")
    return [p for p in nvidia_files(layout) if os.path.dirname(p) == dev and _GPU_NODE.fullmatch(os.path.basename(p))]


def gpu_devices(uuid: str, pci: str = "", layout: GpuLayout = DRIVER) -> tuple[list[str], list[str]]:
    """The NVIDIA device files a worker whose GPU is `uuid` (`pci`) may open (read, write, ioctl): the control files
    the host has (nvidia-uvm-tools and nvidia-modeset only where it holds them open), and its own GPU's /dev/nvidiaN:
    its minor from the driver's /proc (`gpu_minor`), else the GPU files it already holds open (a worker sees one GPU:
    CUDA_VISIBLE_DEVICES), else none. Never another GPU's:
    until round 40 every /dev/nvidia* of the host, so a tenant's code could open another tenant's GPU. Also returns
    what is amiss (for the sandbox report): no own file found, or another GPU's file held open from before."""
    dev = layout.dev
    opened = nvidia_files(layout)
    nodes = [os.path.join(dev, n) for n in CONTROL_NODES if os.path.exists(os.path.join(dev, n))]
    nodes += [os.path.join(dev, n) for n in HELD_CONTROL_NODES if os.path.join(dev, n) in opened]
    held = held_gpu_nodes(layout)
    minor = gpu_minor(uuid, pci, layout)
    notes: list[str] = []
    if minor is not None:
        own = [os.path.join(dev, f"nvidia{minor}")]
    else:
        own = held
        where = f"{', '.join(held)} (the GPU files it holds open)" if held else "none"
        notes.append(f"GPU {uuid or pci or '?'} not in {layout.driver}/gpus: its device file granted: {where}")
    notes += [f"{path} open from before the ruleset (not this worker's GPU)" for path in held if path not in own]
    return nodes + own, notes


def driver_paths(folder: str, minor: int | None, layout: GpuLayout = DRIVER) -> list[str]:
    """What a worker of the GPU whose driver folder is `folder` ("" where unknown), device minor `minor`, may read of
    the driver's /proc/driver/nvidia: each entry (params, version, registry, ...) but `gpus`, of which only its own
    GPU's folder, and `capabilities`, of which each entry but the other GPUs' `gpuN` (their MIG instances). Until
    round 41 the whole folder: every GPU's UUID, PCI address, model and power state, and their MIG layouts."""
    out: list[str] = []
    try:
        entries = sorted(os.listdir(layout.driver))
    except OSError:
        return out
    for name in entries:
        path = os.path.join(layout.driver, name)
        if name == "gpus":
            out += [os.path.join(path, folder)] if folder else []
        elif name == "capabilities":
            try:
                caps = sorted(os.listdir(path))
            except OSError:
                continue
            out += [os.path.join(path, c) for c in caps if not re.fullmatch(r"gpu\d+", c) or c == f"gpu{minor}"]
        else:
            out.append(path)
    return out


def gpu_paths(uuid: str = "", pci: str = "", layout: GpuLayout = DRIVER) -> tuple[list[str], list[str], list[str]]:
    """On a real GPU, after the worker made its CUDA context: (what it reads: the libraries CUDA mapped, the CUDA JIT
    cache, of the driver's /proc its own GPU's entries (`driver_paths`), of /sys the PCI bus's folder, the NUMA nodes
    and its own GPU's device folder, of /dev/nvidia-caps the capability files its context opened (a MIG instance's);
    the NVIDIA device files it reads, writes and sends ioctls to: `gpu_devices`; what is amiss). Until round 41 every
    GPU's entries of /proc/driver/nvidia and /sys/devices, and every file of /dev/nvidia-caps."""
    cache = os.environ.get("CUDA_CACHE_PATH") or os.path.expanduser("~/.nv/ComputeCache")
    devices, notes = gpu_devices(uuid, pci, layout)
    own = own_gpu(uuid, pci, layout)
    folder, minor = own if own else ("", None)
    address = folder or pci.lower()
    reads = mapped_paths() | {cache, *driver_paths(folder, minor, layout)}
    reads |= {os.path.join(layout.sys, p) for p in GPU_READ}
    if address:
        reads.add(os.path.realpath(os.path.join(layout.sys, "bus", "pci", "devices", address)))
    caps = os.path.join(layout.dev, "nvidia-caps") + "/"
    reads |= {p for p in nvidia_files(layout) if p.startswith(caps)}
    return _minimal(reads - set(devices)), devices, notes


# Of a worker's own /proc/PID: what no rule grants. `net` is the network namespace's, not the process's: the host's
# TCP connections (the daemon's clients' addresses and ports, every tenant's), unix sockets (their paths and abstract
# names) and interfaces (round 41: read from every worker until then; round 42: from a worker granted network too,
# which read /proc/net/tcp to tell its own store connection from others': server/collectives.py `_keep_own`
# asks its own sockets now); `task` is listed only (each thread's folder has a `net` of its own). Magic links (cwd,
# root, exe) are never followed: a rule on one would be a rule on its target.
PROC_SELF_WITHHELD = ("net", "task")


def proc_self(pid: int = 0) -> tuple[list[str], list[str]]:
    """(what a worker may read of its own /proc/PID: each entry but PROC_SELF_WITHHELD and the magic links; what it
    may only list: `task`)."""
    root = f"/proc/{pid or os.getpid()}"
    try:
        entries = _proc_entries(root)
    except OSError:
        return [], []
    reads = [os.path.join(root, name) for name, _is_dir in entries if name not in PROC_SELF_WITHHELD]
    return sorted(reads), [os.path.join(root, "task")]


def _proc_entries(root: str) -> list[tuple[str, bool]]:
    """(name, is a folder) of each entry of `root` but the magic links."""
    with os.scandir(root) as entries:
        return [(e.name, e.is_dir(follow_symlinks=False)) for e in entries if not e.is_symlink()]


def _add_fd(ruleset: int, fd: int, access: int, is_dir: bool) -> str:
    """One rule: `access` beneath the file `fd` holds (O_PATH) ("" when added, else the kernel's why not)."""
    attr = _PathBeneath(access if is_dir else access & FILE_RIGHTS, fd)
    if _libc.syscall(ctypes.c_long(NR_ADD_RULE), ruleset, RULE_PATH_BENEATH, ctypes.byref(attr), 0) != 0:
        return os.strerror(ctypes.get_errno())
    return ""


def _add_path(ruleset: int, path: str, access: int) -> str:
    """One rule: `access` beneath `path` ("" when added, else why not)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    try:
        why = _add_fd(ruleset, fd, access, stat.S_ISDIR(os.fstat(fd).st_mode))
    finally:
        _keep_or_close(fd, path)
    return f"{path}: {why}" if why else ""


# The O_PATH descriptors of the rules on /proc files, held for the process's life. A rule belongs to an inode, and
# procfs makes a new inode each time it looks a name up again after its dentry was reclaimed (memory pressure, or
# `echo 2 > /proc/sys/vm/drop_caches`): the rule would then cover nothing, and a worker that read /proc/self/maps
# (glibc's pthread_getattr_np, torch, CUDA) a moment before got EACCES (round 41 review: every entry of
# /proc/self lost after one drop_caches). A held descriptor keeps the dentry, so the name keeps its inode. sysfs
# and disk files find the same inode again (iget) while the rule holds it. A worker holds 52 (of its 256 open files:
# sandbox.set_rlimits), one granted network too since round 42 (until then 2: its whole /proc/PID was one rule).
_PINNED: list[int] = []


def _keep_or_close(fd: int, path: str) -> None:
    """Hold `fd` for good where `path` is of procfs (`_PINNED`), else close it."""
    if path == "/proc" or path.startswith("/proc/"):
        _PINNED.append(fd)
    else:
        os.close(fd)


def held() -> tuple[int, ...]:
    """The descriptors `_PINNED` holds (O_PATH, of /proc files whose reads the rules grant anyway)."""
    return tuple(_PINNED)


def _unpin() -> None:
    """Close the held descriptors (a ruleset that was not applied)."""
    while _PINNED:
        os.close(_PINNED.pop())


def _add_own_proc(ruleset: int, handled_fs: int) -> list[str]:
    """The rules of the worker's own /proc/PID (`proc_self`): each entry opened beside the others (one system call
    each, no path walk, no stat: 49 rules cost ~0.8 ms as `_add_path`s), each descriptor held (`_PINNED`); what
    failed."""
    root = f"/proc/{os.getpid()}"
    missing: list[str] = []
    try:
        folder = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return [f"landlock read {root}: {exc.strerror}"]
    try:
        for name, is_dir in _proc_entries(root):
            if name in PROC_SELF_WITHHELD and name != "task":
                continue
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
            except OSError as exc:
                missing.append(f"landlock read {root}/{name}: {exc.strerror}")
                continue
            try:
                why = _add_fd(ruleset, fd, (FS_READ_DIR if name == "task" else READ) & handled_fs, is_dir)
            finally:
                _PINNED.append(fd)  # the entry keeps its inode, and so its rule (`_PINNED`)
            if why:
                missing.append(f"landlock read {root}/{name}: {why}")
    except OSError as exc:
        missing.append(f"landlock read {root}: {exc.strerror}")
    finally:
        _PINNED.append(folder)  # (its entries' dentries hold it anyway)
    return missing


def _add_ports(ruleset: int, ports: list[tuple[int, int]]) -> list[str]:
    """One rule a (port, rights) (RULE_NET_PORT); what failed. One struct and one call's arguments for all (a
    range's 257 rules: ~0.8 ms with a struct and arguments made per call, about half of it the kernel's)."""
    missing: list[str] = []
    attr = _NetPort()
    call, nr, ref = _libc.syscall, ctypes.c_long(NR_ADD_RULE), ctypes.byref(attr)
    for port, access in ports:
        attr.allowed_access, attr.port = access, port
        if call(nr, ruleset, RULE_NET_PORT, ref, 0) != 0:
            missing.append(f"landlock port {port}: {os.strerror(ctypes.get_errno())}")
    return missing


def net_rules(
    network: bool, ports: tuple[int, int] | None, gloo: bool, own: tuple[int, int] | None = None
) -> tuple[int, list[tuple[int, int]]]:
    """(the TCP rights a ruleset handles, the (port, rights) it grants) of a worker: without `network` none at all
    (both handled, no rule); with it, connect in `ports` (the daemon's --collective-ports, LOW and HIGH) and to
    DNS_PORT, and bind in `own` only (FIRST, LAST: its session's block of the range, server/portshare.py, round 43;
    None: the whole range); with `gloo` connect is not handled (gloo's pairs dial the ports their peers' kernels
    picked) and bind also port 0 (gloo's listener: a port the kernel picks). `ports` None with `network`: nothing
    handled (any port, as before round 42)."""
    both = NET_BIND_TCP | NET_CONNECT_TCP
    if not network:
        return both, []
    if ports is None:
        return 0, []
    first, last = own or ports
    if gloo:
        return NET_BIND_TCP, [(0, NET_BIND_TCP)] + [(p, NET_BIND_TCP) for p in range(first, last + 1)]
    rules = [(p, both if first <= p <= last else NET_CONNECT_TCP) for p in range(ports[0], ports[1] + 1)]
    return both, rules + [(DNS_PORT, NET_CONNECT_TCP)]


def restrict(
    *,
    network: bool,
    gpu: bool,
    ports: tuple[int, int] | None = None,
    gloo: bool = False,
    own: tuple[int, int] | None = None,
    version: int = -1,
    gpu_uuid: str = "",
    gpu_pci: str = "",
    layout: GpuLayout = DRIVER,
) -> tuple[list[str], list[str]]:
    """Confine the calling thread (and every thread and process it starts from now on) for good; the caller has set
    no_new_privs. `network`: keep TCP bind and connect (a lease that grants network: collectives). `gpu`: a real GPU
    (its driver files and libraries, and of the device files the control ones and those of the GPU `gpu_uuid`, PCI
    address `gpu_pci`, only: `gpu_devices`). With `network` and `ports` (--collective-ports: LOW, HIGH) TCP bind and
    connect in those ports only, bind in `own` only (its session's block of them: FIRST, LAST), `gloo` (--collectives
    gloo) connect anywhere (`net_rules`). Returns (what was applied, what is missing)."""
    version = abi() if version < 0 else version
    if version <= 0:
        return [], ["landlock: not in this kernel"]
    handled_fs = FS_ABI1 | (FS_REFER if version >= 2 else 0) | (FS_TRUNCATE if version >= 3 else 0)
    handled_fs |= FS_IOCTL_DEV if version >= 5 else 0
    handled_net, port_rules = net_rules(network, ports, gloo, own) if version >= 4 else (0, [])
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if version >= 6 else 0
    attr = _RulesetAttr(handled_fs, handled_net, scoped)
    size = 24 if version >= 6 else 16 if version >= 4 else 8
    ruleset = int(_libc.syscall(ctypes.c_long(NR_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size), 0))
    if ruleset < 0:
        return [], [f"landlock: {os.strerror(ctypes.get_errno())}"]
    missing: list[str] = []
    try:
        reads = list(read_paths())
        reads += NETWORK_READ if network else ()
        reads += GLOO_READ if network and gloo else ()
        devices = ["/dev/null"]
        if gpu:
            more, nvidia, notes = gpu_paths(gpu_uuid, gpu_pci, layout)
            reads += more
            devices += nvidia
            missing += [f"landlock: {note}" for note in notes]
        for path in reads:
            if os.path.exists(path):
                why = _add_path(ruleset, path, READ & handled_fs)
                if why:
                    missing.append(f"landlock read {why}")
        missing += _add_own_proc(ruleset, handled_fs)  # /proc/self, less the host's connections
        missing += _add_ports(ruleset, port_rules)
        for path in devices:
            why = _add_path(ruleset, path, DEVICE & handled_fs)
            if why:
                missing.append(f"landlock device {why}")
        if _libc.syscall(ctypes.c_long(NR_RESTRICT_SELF), ruleset, 0) != 0:
            why = os.strerror(ctypes.get_errno())
            _unpin()
            return [], [*missing, f"landlock: {why}"]
    except BaseException:
        _unpin()
        raise
    finally:
        os.close(ruleset)
    applied = [f"landlock ABI {version}"]
    if handled_net and not network:
        applied.append("landlock: no TCP bind or connect")
    elif handled_net and ports is not None:
        first, last = own or ports
        if gloo:
            applied.append(f"landlock: TCP bind in ports {first}-{last} or one the kernel picks only; connect anywhere")
        else:
            where = f"{ports[0]}-{ports[1]} only, bind in {first}-{last}"
            applied.append(f"landlock: TCP bind and connect in ports {where}")
    missing += [f"landlock: {what}" for at, what in MISSING_BELOW.items() if version < at]
    try:
        others = len(os.listdir("/proc/self/task")) - 1
    except OSError:
        others = 0
    if others:  # started before the ruleset (a real GPU's CUDA threads): outside it; their code is never a tenant's
        missing.append(f"landlock: {others} thread(s) started before it stay outside")
    return applied, missing
