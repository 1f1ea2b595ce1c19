"""Least privilege for a session worker, applied right after it is forked (and, on a real GPU, after its CUDA
context exists): so a kernel bug a tenant finds stays inside that tenant's own process.

- rlimits: host memory (RLIMIT_DATA: the session's quota plus headroom on fake GPUs, headroom on real ones),
  no core dumps, a small number of open files, no new files;
- a daemon started as root drops the worker to an unprivileged user (`--worker-user`, default `nobody`; uid,
  gid and groups): no capabilities, and it can neither signal the daemon nor read root-only files such as the
  token key. A drop that fails ends the worker rather than leave it root;
- Landlock (server/landlock.py, `--landlock`): the files a worker may read (Python's, torch's and CUDA's, /proc/self),
  none it may write, TCP only for workers granted network, no signals or abstract unix sockets outside the worker;
  round 39 found a non-root daemon's worker reading the daemon's TLS key;
- `PR_SET_NO_NEW_PRIVS`, and a seccomp filter (libseccomp through ctypes, where the library exists) that
  denies with EPERM: sockets and network calls (kept only for workers whose lease token grants network),
  exec, fork (threads stay allowed), opening files for writing or truncating and changing the file system
  (metadata and extended attributes included), resizing a file through a descriptor, ptrace and other processes'
  memory, signals to other processes by any call (kill, the queued and thread forms, a descriptor's SIGIO owner),
  changing other processes' limits, priorities and scheduling, file locks and leases, io_uring and AIO (which
  open files and sockets, and take the host's AIO slots, past this filter), System V IPC and POSIX message
  queues (objects that outlive the worker and that every worker of the user shares), mounts, namespaces,
  keyrings, BPF, secret memory and module loading; on a fake GPU also shared anonymous memory (outside
  RLIMIT_DATA, the cap of its tensors). Round 38 (sandbox38) found each of those reachable from attacker code in
  a worker (tests/integration/test_worker_sandbox.py).

`apply` returns what it could do, so the daemon can log it and tests can assert it; a missing piece other
than the user drop (no libseccomp, a kernel without seccomp) degrades to the rest with a warning, never to a
daemon that will not run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import grp
import logging
import os
import platform
import pwd
import resource
import signal
import socket
import stat
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_NE, _SCMP_CMP_GT, _SCMP_CMP_MASKED_EQ = 1, 6, 7
_SCMP_FLTATR_CTL_OPTIMIZE = 8
CLONE_THREAD = 0x00010000
O_ACCMODE, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC = 0o3, 0o1, 0o2, 0o100, 0o1000
MAP_SHARED, MAP_ANONYMOUS = 0x01, 0x20
_INT = 0xFFFFFFFF  # the kernel reads these arguments as 32-bit ints: a filter compares the low half only
# fcntl commands: a descriptor's signal owner (its SIGIO, or the F_SETSIG signal, goes to any process of the same
# user: round 38 killed another session's worker with a pipe's O_ASYNC), locks and leases (on a file the worker
# may only read, a lock can stall another process of the host for as long as the worker lives), dnotify (signals).
F_SETLK, F_SETLKW, F_SETOWN, F_SETSIG, F_SETOWN_EX, F_OFD_SETLK, F_OFD_SETLKW = 6, 7, 8, 10, 15, 37, 38
F_SETLEASE, F_NOTIFY = 1024, 1026
DENIED_FCNTL = (F_SETLK, F_SETLKW, F_SETOWN, F_SETSIG, F_SETOWN_EX, F_OFD_SETLK, F_OFD_SETLKW, F_SETLEASE, F_NOTIFY)
# ioctl requests: a socket's signal owner (FIOSETOWN, SIOCSPGRP), and a terminal's (the daemon's stderr may be
# one): typing into it (TIOCSTI), TIOCLINUX, the foreground group and controlling terminal.
DENIED_IOCTL = (0x8901, 0x8902, 0x5412, 0x541C, 0x5410, 0x540E)

# The calls a worker of a daemon with `--worker-network on` keeps: torch.distributed's gloo (and NCCL's
# bootstrap) between the daemons of a multi-GPU job open, bind, listen on and connect TCP sockets.
# (Not socketpair, round 43 review: it makes unix sockets, which socket() refuses below, and a worker used them to send
# datagrams to the host's unix socket files, /dev/log and journald's, and to bind the abstract names that hold a
# daemon's --collective-ports, server/portshare.py, denying other tenants theirs.)
NETWORK_SYSCALLS = ("socket", "connect", "bind", "listen", "accept", "accept4")
# The address families of those sockets (AF_INET, AF_INET6, and NETLINK_ROUTE for getifaddrs): round 38 found a
# granted worker could open any, so connect to the host's abstract unix sockets (services that trust local peers),
# other netlink protocols (sock_diag, audit, uevents), AF_ALG (the kernel's crypto API), and so on.
AF_NETLINK, NETLINK_ROUTE = 16, 0
AF_INET, AF_INET6 = 2, 10
NETWORK_FAMILIES = (AF_INET, AF_INET6, AF_NETLINK)  # (netlink: NETLINK_ROUTE only, for getifaddrs)
# Of IPv4 and IPv6 sockets, TCP (SOCK_STREAM) only (round 43): UDP reached any port of any host (Landlock has no UDP
# rules, and seccomp cannot read a sendto's address), and so did ICMP ping sockets (SOCK_DGRAM, IPPROTO_ICMP); raw,
# SCTP (SOCK_SEQPACKET) and DCCP sockets likewise. Name lookups go over TCP to port 53 instead (RES_OPTIONS use-vc in
# the zygote's environment: server/zygote.py), which Landlock allows (landlock.net_rules).
SOCK_STREAM, SOCK_TYPE_MASK = 1, 0xF  # (the type argument's low bits; SOCK_NONBLOCK and SOCK_CLOEXEC above them)
# And of those stream sockets TCP's protocol only (0 or IPPROTO_TCP; round 43 review): MPTCP (262), SCTP (132) and SMC
# (256) are SOCK_STREAM too, and Landlock's TCP rules hold TCP sockets only: an MPTCP socket connected to any port.
IPPROTO_TCP = 6
# Denied outright. (Reading files stays allowed: Python and torch load modules lazily.)
DENIED_SYSCALLS = (
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "execve",
    "execveat",
    "fork",
    "vfork",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "creat",
    "openat2",
    "open_by_handle_at",
    "name_to_handle_at",
    "truncate",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "mkdir",
    "mkdirat",
    "rmdir",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "chmod",
    "fchmod",
    "fchmodat",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "mknod",
    "mknodat",
    "utimensat",
    "utimes",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "swapon",
    "swapoff",
    "reboot",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "iopl",
    "ioperm",
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setgroups",
    "acct",
    "quotactl",
    "settimeofday",
    "clock_settime",
    "adjtimex",
    "sethostname",
    "setdomainname",
    "pidfd_open",
    "pidfd_getfd",
    "pidfd_send_signal",
    "memfd_create",
    "memfd_secret",
    # round 38: each reached from attacker code in a worker (tests/integration/test_worker_sandbox.py)
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "io_setup",
    "io_destroy",
    "io_submit",
    "io_cancel",
    "io_getevents",
    "io_pgetevents",
    "ftruncate",
    "fallocate",
    "flock",
    "utime",
    "futimesat",
    "fchmodat2",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "setxattrat",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "removexattrat",
    "shmget",
    "shmat",
    "shmctl",
    "shmdt",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "semget",
    "semop",
    "semtimedop",
    "semctl",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
    "open_tree",
    "open_tree_attr",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "fanotify_init",
    "quotactl_fd",
    "kcmp",
    "migrate_pages",
    "move_pages",
    "process_madvise",
    "process_mrelease",
    "syslog",
    "vhangup",
)
# Calls whose first argument names the process they change (0: the caller): denied for any other process. A
# thread setting its own affinity or priority by its tid is refused too (torch sets none).
_SELF_ONLY_ARG0 = ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr")
_SELF_ONLY_ARG1 = ("setpriority", "ioprio_set")  # (which, who, ...)
# clone3 passes its flags in memory, where a filter cannot look: ENOSYS makes libc fall back to clone.
_ENOSYS_SYSCALLS = ("clone3",)
# The newest x86_64 call this filter's lists were reviewed against (462, mseal, Linux 6.10). Every later number up to
# the x32 range (512) is ENOSYS, as on a kernel without it: a call added after the review (463 setxattrat, 469
# file_setattr... on this 6.18 kernel) is refused until someone reads it and lists it, instead of allowed.
REVIEWED_THROUGH = 462
_ENOSYS_FROM, _ENOSYS_TO = REVIEWED_THROUGH + 1, 511


@dataclass
class SandboxReport:
    """What `apply` managed: each item is a short fact ("seccomp", "no_new_privs", "uid 65534", ...)."""

    applied: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> bool:
    return bool(_libc().prctl(option, ctypes.c_ulong(arg), 0, 0, 0) == 0)


def not_dumpable() -> bool:
    """PR_SET_DUMPABLE 0 for the calling process (the daemon's and the zygote's first step; a worker's in `apply`):
    its /proc/PID files then belong to root, so a process of its uid that is not root (a non-root daemon's worker
    where no Landlock confines it) can neither read its environ, maps, fd, io or mem nor ptrace it, and the kernel
    writes no core dump of it unless fs.suid_dumpable is 2 (then root's, for a core pattern's pipe or absolute
    path). Kept by fork, reset by exec and by a change of uid. Until round 41 (secrev41) the daemon and the zygote
    were dumpable: such a worker read the daemon's memory, every session id and the TLS key in it. A debugger or
    py-spy attaches to them only with CAP_SYS_PTRACE (as root). Returns whether the kernel took it."""
    return _prctl(PR_SET_DUMPABLE, 0)


def worker_tasks() -> int:
    """RLIMIT_NPROC of a worker with a uid of its own (`--worker-uids`): its threads (torch's intra- and inter-op
    pools and OpenBLAS's, a core each at most, collectives' and CUDA's few) with room to spare."""
    return 4 * (os.cpu_count() or 1) + 64


def shared_tasks() -> int:
    """RLIMIT_NPROC of a worker that shares its user with the others (`--worker-uids off`, or no free range): the
    user's tasks together, all workers' (64 sessions of `worker_tasks`) but at most half the host's pid_max, so
    that a worker's thread bomb leaves the daemon (root: not counted) and the rest of the host pids to start."""
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            pid_max = int(f.read())
    except (OSError, ValueError):
        pid_max = 32768
    return max(worker_tasks(), min(64 * worker_tasks(), pid_max // 2))


def set_rlimits(memory_bytes: int, open_files: int = 256, tasks: int = 0) -> list[str]:
    done = []
    if tasks > 0:  # counted per user: a uid of the worker's own bounds the worker, a shared user all workers
        resource.setrlimit(resource.RLIMIT_NPROC, (tasks, tasks))
        done.append(f"{tasks} tasks")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    done.append("no core dumps")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = open_files if hard == resource.RLIM_INFINITY else min(open_files, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    done.append(f"{limit} open files")
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
        done.append(f"{memory_bytes} bytes of host memory")
    return done


def drop_user(name: str = "nobody", uid: int = -1, groups: tuple[int, ...] = ()) -> str:
    """As root: become an unprivileged user (no capabilities): `uid` as uid and gid where given (a worker's own,
    `--worker-uids`), else user `name`'s, with supplementary `groups` only (the GPU device files' group:
    `gpu_device_groups`); returns what was done."""
    if os.geteuid() != 0:
        return f"uid {os.geteuid()} (not root: kept)"
    if uid > 0:
        gid = uid
    else:
        entry = pwd.getpwnam(name)
        uid, gid = entry.pw_uid, entry.pw_gid
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    return f"uid {uid}"


def kill_uid_leftovers() -> str:
    """As a worker's own uid (`--worker-uids`), before anything of its session runs: SIGKILL every other process of
    that uid (kill(-1) reaches those whose real or saved uid is the caller's, never the caller). The uid locks
    (`WorkerUids`) live in the daemon: a daemon that died or was restarted freed them at once, while a worker of it
    that had not yet read its socket's end (or whose code ignores it: a compromised worker) lived on, and the next
    daemon gave its uid to a new worker, which it could then signal, retune and see in /proc (round 38's review)."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:  # none left: the common case
        return "no earlier process of its uid"
    return "earlier processes of its uid killed"


# `--worker-uids`'s default for a root daemon: above systemd-nspawn's container uids (524288-1879048191) and
# below both 2^31 (tools that read a uid as a signed int) and systemd's foreign range (2147352576-); no distribution
# allocates here, and `WorkerUids.clashes` checks the host's accounts, groups and subordinate ranges at start.
DEFAULT_WORKER_UIDS = "2000000000-2000065535"
UID_LOCKS = "/run/gpupool/worker-uids"  # a file per uid in use, flock'd by the daemon that gave it (host-wide)


class UidLocksUnusable(OSError):
    """The uid lock directory (`WorkerUids.locks`) cannot hold a lock file: no worker can be given a uid."""


def _sub_ranges(path: str) -> list[tuple[str, int, int]]:
    """/etc/subuid or /etc/subgid: (owner, first, last) of each allocation."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() and int(parts[2]) > 0:
                    out.append((parts[0], int(parts[1]), int(parts[1]) + int(parts[2]) - 1))
    except OSError:
        pass
    return out


class WorkerUids:
    """`--worker-uids FIRST-LAST` (a root daemon's default: DEFAULT_WORKER_UIDS): a uid (and gid) of its own for
    each session's worker, so that no two workers share a user. Workers of one user can signal each other, change
    each other's limits and scheduling, reach each other's IPC objects, see each other in /proc, and share one count
    of tasks (RLIMIT_NPROC): with a uid each, the kernel's own checks keep them apart and RLIMIT_NPROC bounds each
    worker's threads (`worker_tasks`). A uid is given to one worker at a time, taken in turn through the range (not
    again at once), and free again once the worker it was given to is gone (its pid no longer exists: a worker lives
    on after its session closes until the zygote's kill lands). Daemons of one host share the range: a uid in use
    is also an flock on its file under `locks` (UID_LOCKS), which another daemon's `take` skips. The file lives as
    long as the lock: whoever gives a uid back removes its file while it still holds the lock, and whoever locks a
    file checks that the lock is on the file the name still names (else it opens the name again), so that a lock
    on a removed file gives nobody a uid (round 39: until then a file stayed for every uid ever used, up to 65,536
    of them, and `check_locks` removes such files of earlier daemons at start)."""

    def __init__(self, first: int, last: int, locks: str = UID_LOCKS) -> None:
        if not 0 < first <= last < 2**32 - 1:
            raise ValueError(f"--worker-uids {first}-{last}: want 0 < FIRST <= LAST < 4294967295")
        self.first, self.last = first, last
        self.locks = locks
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}  # uid -> its worker's pid (0 while it starts, or while its session lives)
        self._done: dict[int, int] = {}  # uid -> pid of a closed session's worker, until that pid is gone
        self._fds: dict[int, int] = {}  # uid -> the descriptor of its flock'd file (held or done)
        self._next = first

    @staticmethod
    def parse(text: str) -> WorkerUids | None:
        """`FIRST-LAST` ("" or "off": none); ValueError on anything else."""
        if text in ("", "off"):
            return None
        first, sep, last = text.partition("-")
        if not sep or not first.strip().isdigit() or not last.strip().isdigit():
            raise ValueError(f"--worker-uids {text!r}: want FIRST-LAST, two uids, or off")
        return WorkerUids(int(first), int(last))

    def users(self) -> list[str]:
        """Users of the host's passwd whose uid lies in the range (a worker must never be one of them)."""
        return [e.pw_name for e in pwd.getpwall() if self.first <= e.pw_uid <= self.last]

    def clashes(self) -> list[str]:
        """What of the host's already lies in the range: accounts and groups (through NSS), and the subordinate
        uids and gids of /etc/subuid and /etc/subgid (user namespaces' ids: a worker must not be a container's)."""
        out = [f"user {n}" for n in self.users()]
        out += [f"group {e.gr_name}" for e in grp.getgrall() if self.first <= e.gr_gid <= self.last]
        for path in ("/etc/subuid", "/etc/subgid"):
            out += [f"{path} {owner}:{lo}-{hi}" for owner, lo, hi in _sub_ranges(path)
                    if lo <= self.last and self.first <= hi]  # fmt: skip
        return out

    def check_locks(self) -> None:
        """At start: the lock directory exists (made) and takes new files (UidLocksUnusable naming it, else: a
        read-only /run made every Attach a RESOURCE_EXHAUSTED until round 39); files of the range that nobody
        holds (an earlier daemon's, before round 39 or killed) are removed."""
        try:
            os.makedirs(self.locks, mode=0o700, exist_ok=True)
            try:  # a file with no name, gone when closed: can this daemon make files here?
                os.close(os.open(self.locks, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # (no O_TMPFILE there)
                    raise
                if not os.access(self.locks, os.W_OK | os.X_OK):
                    raise OSError(errno.EACCES, os.strerror(errno.EACCES)) from None
            names = os.listdir(self.locks)
        except OSError as exc:
            raise self._unusable(exc) from None
        with self._lock:
            for name in names:
                if name.isdigit() and self.first <= int(name) <= self.last and int(name) not in self._fds:
                    try:
                        if self._claim(int(name)):
                            self._release(int(name))
                    except UidLocksUnusable:
                        pass  # (nothing removed: `take` says so when it matters)

    def _unusable(self, exc: OSError) -> UidLocksUnusable:
        return UidLocksUnusable(
            exc.errno or errno.EIO,
            f"the uid lock directory {self.locks} is unusable ({exc.strerror or exc}): the daemons of a host lock each "
            "worker's uid there (--worker-uids); make it a directory root can write (/run is a tmpfs on most hosts), "
            "or pass --worker-uids off",
        )

    def _claim(self, uid: int) -> bool:
        """Hold `uid`'s file under `locks` (False: another daemon of the host holds it); UidLocksUnusable where no
        file can be made there."""
        path = os.path.join(self.locks, str(uid))
        for _ in range(8):  # (another try each time a holder removed the file meanwhile: see the class)
            try:
                os.makedirs(self.locks, mode=0o700, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise self._unusable(exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                mine, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
            except OSError:  # held (EWOULDBLOCK), or the name is gone (removed by the holder we waited for)
                os.close(fd)
                if os.path.lexists(path):
                    return False
                continue
            if (mine.st_dev, mine.st_ino) != (named.st_dev, named.st_ino):
                os.close(fd)  # locked a file its holder removed: the name is another file now
                continue
            self._fds[uid] = fd
            return True
        return False

    def _release(self, uid: int) -> None:
        """Give `uid`'s file up: removed first, while still locked (no daemon then holds a lock on a removed file
        and a uid with it: `_claim` checks), then unlocked."""
        fd = self._fds.pop(uid, -1)
        if fd >= 0:
            try:
                os.unlink(os.path.join(self.locks, str(uid)))
            except OSError:
                pass  # (a directory made read-only since: the file stays, unlocked, as before round 39)
            os.close(fd)

    def take(self) -> int:
        """A uid no live worker of this daemon (or another of the host) holds; OSError(EAGAIN) when every uid of the
        range is held."""
        with self._lock:
            for uid, pid in list(self._done.items()):
                if not os.path.exists(f"/proc/{pid}"):
                    del self._done[uid]
                    self._release(uid)
            size = self.last - self.first + 1
            for k in range(size):
                uid = self.first + (self._next - self.first + k) % size
                if uid not in self._held and uid not in self._done and self._claim(uid):
                    self._next = self.first + (uid - self.first + 1) % size
                    self._held[uid] = 0
                    return uid
        raise OSError(errno.EAGAIN, f"every uid of --worker-uids {self.first}-{self.last} is held by a worker")

    def give_back(self, uid: int, pid: int) -> None:
        """The session of the worker `pid` (0: none started) that holds `uid` ended: free once that pid is gone."""
        with self._lock:
            self._held.pop(uid, None)
            if pid > 0:
                self._done[uid] = pid
            else:
                self._release(uid)

    def close(self) -> None:
        """The daemon stops: the uids of its workers that are gone are free for other daemons (one whose worker
        still lives stays held until this process exits)."""
        with self._lock:
            for uid in list(self._fds):
                pid = self._done.get(uid, self._held.get(uid, 0))
                if not pid or not os.path.exists(f"/proc/{pid}"):
                    self._done.pop(uid, None)
                    self._held.pop(uid, None)
                    self._release(uid)


# GPU device files a CUDA worker opens read-write (the driver's; NVIDIA's default mode is 0666)
GPU_DEVICE_GLOB = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia[0-9]*")


def gpu_device_groups(paths: list[str]) -> tuple[tuple[int, ...], list[str]]:
    """Which supplementary groups a worker of no account needs to open `paths` read-write, and which it could
    not open at all: a file is fine when others may read and write it, or when its group (not root's) may, which
    the worker then joins; a file only root or one user may use is listed (the operator must `chgrp` it)."""
    groups: set[int] = set()
    unusable = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_mode & (stat.S_IROTH | stat.S_IWOTH) == stat.S_IROTH | stat.S_IWOTH:
            continue
        if st.st_gid != 0 and st.st_mode & (stat.S_IRGRP | stat.S_IWGRP) == stat.S_IRGRP | stat.S_IWGRP:
            groups.add(st.st_gid)
        else:
            unusable.append(f"{path} ({stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid})")
    return tuple(sorted(groups)), unusable


MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x4000, 0x40000, 0x2, 0x4, 0x8
CLONE_NEWNS = 0x00020000


def private_proc() -> str:
    """As root, in a freshly forked single-threaded worker: a mount namespace of its own (no propagation back to
    the host's) with a new /proc mounted hidepid=invisible, so that once it has dropped to a user of its own the
    worker sees only its own processes: no host process list, no other worker's /proc/PID/stat (scheduling and
    memory counters: a side channel). Kept (returns why) where /proc has mounts over it (a container's masked
    files: a fresh proc would show them) or the kernel refuses."""
    if os.geteuid() != 0:
        return "not root"
    try:
        with open("/proc/self/mountinfo") as f:
            over = [line.split()[4] for line in f if line.split()[4].startswith("/proc/")]
    except OSError as exc:
        return f"mountinfo: {exc}"
    if over:
        return f"mounts over /proc ({over[0]}...)"
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        return f"unshare: {os.strerror(ctypes.get_errno())}"
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return f"making / private: {os.strerror(ctypes.get_errno())}"
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if libc.mount(b"proc", b"/proc", b"proc", flags, b"hidepid=2") != 0:
        return f"mount proc: {os.strerror(ctypes.get_errno())}"
    return ""


_seccomp_path: list[str | None] = []


def seccomp_library() -> str | None:
    """libseccomp's name (None: not installed), found once in the zygote: `find_library` runs `ldconfig -p` (a fork
    and an exec), which until round 39 every worker did at its start, and which a worker under Landlock cannot."""
    if not _seccomp_path:
        _seccomp_path.append(ctypes.util.find_library("seccomp"))
    return _seccomp_path[0]


def name_unix_sockets() -> str:
    """Give every unnamed unix socket of this process (a worker's link to its daemon) a name the kernel picks
    (autobind): bind() refuses a named socket, so a worker granted network (which keeps bind for TCP) cannot bind its
    link to an abstract name of the host's: round 43's review bound it to those that hold a daemon's --collective-ports
    (server/portshare.py), another tenant's share of them included, one name a session's worker."""
    named = 0
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if s.family == socket.AF_UNIX and not s.getsockname():
                s.bind("")  # (an empty name: the kernel's own, an abstract "\0" and five hex digits)
                named += 1
        finally:
            s.detach()
    return f"{named} unix socket(s) named"


def seccomp_filter(network: bool = False, shared_anonymous: bool = True) -> bool:
    """Load the filter described above (with `network`: less NETWORK_SYSCALLS; without `shared_anonymous`: no
    MAP_SHARED | MAP_ANONYMOUS mappings); False without libseccomp."""
    path = seccomp_library()
    if not path:
        return False
    lib = ctypes.CDLL(path, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        return False
    # A binary tree of the rules' call numbers (libseccomp >= 2.5), not a list each call walks: round 38's rules
    # (228, from 93) would otherwise cost every allowed call a comparison each. Older libraries keep the list.
    lib.seccomp_attr_set(ctypes.c_void_p(ctx), _SCMP_FLTATR_CTL_OPTIMIZE, 2)
    eperm = 0x00050000 | errno.EPERM
    enosys = 0x00050000 | errno.ENOSYS

    def rule(action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # not a syscall on this architecture
        arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
        if lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr) != 0:
            raise OSError(f"seccomp rule for {name} refused")

    try:
        for name in DENIED_SYSCALLS:
            if not (network and name in NETWORK_SYSCALLS):
                rule(eperm, name)
        if network:  # TCP over IPv4 and IPv6, and routing netlink: no unix (the host's abstract sockets), packet...
            for family in range(64):
                if family not in NETWORK_FAMILIES:
                    rule(eperm, "socket", (0, _SCMP_CMP_MASKED_EQ, _INT, family))
            # getifaddrs (gloo finds its interface's address with it) reads NETLINK_ROUTE: no other netlink protocol
            rule(eperm, "socket", (0, _SCMP_CMP_MASKED_EQ, _INT, AF_NETLINK), (2, _SCMP_CMP_NE, NETLINK_ROUTE, 0))
            for family in (AF_INET, AF_INET6):  # TCP only: no UDP, ping, raw, SCTP or DCCP (SOCK_STREAM above)
                for kind in range(SOCK_TYPE_MASK + 1):
                    if kind != SOCK_STREAM:
                        rule(eperm, "socket", (0, _SCMP_CMP_MASKED_EQ, _INT, family),
                             (1, _SCMP_CMP_MASKED_EQ, SOCK_TYPE_MASK, kind))  # fmt: skip
                # (the whole 64-bit register: a value <= 6 has no other low half; the kernel reads the low half)
                rule(eperm, "socket", (0, _SCMP_CMP_MASKED_EQ, _INT, family), (2, _SCMP_CMP_GT, IPPROTO_TCP, 0))
        for name in _ENOSYS_SYSCALLS:
            rule(enosys, name)
        if platform.machine() == "x86_64":
            for nr in range(_ENOSYS_FROM, _ENOSYS_TO + 1):
                if lib.seccomp_rule_add_array(ctx, enosys, nr, 0, None) != 0:
                    raise OSError(f"seccomp rule for call {nr} refused")
        rule(eperm, "clone", (0, _SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0))  # a new process, not a thread
        for name, arg in (("open", 1), ("openat", 2)):
            rule(eperm, name, (arg, _SCMP_CMP_MASKED_EQ, O_ACCMODE, O_WRONLY))
            rule(eperm, name, (arg, _SCMP_CMP_MASKED_EQ, O_ACCMODE, O_RDWR))
            rule(eperm, name, (arg, _SCMP_CMP_MASKED_EQ, O_CREAT, O_CREAT))
            rule(eperm, name, (arg, _SCMP_CMP_MASKED_EQ, O_TRUNC, O_TRUNC))  # truncates even when read-only
        pid = os.getpid()
        # signals only to itself (abort() raises SIGABRT), by every call that takes a process
        for name in ("kill", "tgkill", "tkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            rule(eperm, name, (0, _SCMP_CMP_NE, pid, 0))
        for name in _SELF_ONLY_ARG0:
            rule(eperm, name, (0, _SCMP_CMP_NE, 0, 0))
        for name in _SELF_ONLY_ARG1:
            rule(eperm, name, (1, _SCMP_CMP_NE, 0, 0))
        for cmd in DENIED_FCNTL:
            rule(eperm, "fcntl", (1, _SCMP_CMP_MASKED_EQ, _INT, cmd))
        for request in DENIED_IOCTL:
            rule(eperm, "ioctl", (1, _SCMP_CMP_MASKED_EQ, _INT, request))
        if not shared_anonymous:
            both = MAP_SHARED | MAP_ANONYMOUS  # (MAP_SHARED_VALIDATE includes MAP_SHARED's bit)
            rule(eperm, "mmap", (3, _SCMP_CMP_MASKED_EQ, both, both))
        if lib.seccomp_load(ctx) != 0:
            raise OSError("seccomp_load failed")
    finally:
        lib.seccomp_release(ctx)
    return True


def apply(
    memory_bytes: int,
    *,
    user: str = "nobody",
    seccomp: bool = True,
    network: bool = False,
    shared_anonymous: bool = True,
    uid: int = -1,
    groups: tuple[int, ...] = (),
    landlock: bool = True,
    gpu: bool = False,
    gpu_uuid: str = "",
    gpu_pci: str = "",
    ports: tuple[int, int] | None = None,
    gloo: bool = False,
    block: tuple[int, int] | None = None,
) -> SandboxReport:
    """Confine the calling process for good (there is no way back). Call once, single-threaded. Without
    `shared_anonymous` (a fake GPU's worker, whose tensors RLIMIT_DATA caps) no shared anonymous mappings. With
    `uid` (root only: a uid of the worker's own, `--worker-uids`) that uid instead of `user`'s, and RLIMIT_NPROC
    `worker_tasks`; a root worker dropping to the shared `user` gets RLIMIT_NPROC `shared_tasks`. `groups`: the
    supplementary groups it keeps (the GPU device files': `gpu_device_groups`). With `landlock` (`--landlock`, on by
    default) a Landlock ruleset (server/landlock.py) between the user drop and seccomp: reads of what a worker needs
    only (`gpu`: a real GPU's driver files and its own device file, that of `gpu_uuid` at `gpu_pci`), no writes, TCP
    only with `network`, and then in `ports` only (--collective-ports; bind in `block` only, its session's block of
    them; `gloo`: connect anywhere: landlock.net_rules),
    scoped signals and abstract unix sockets; what the kernel's ABI lacks is in `missing`."""
    report = SandboxReport()

    def step(what: str, fn: object) -> None:
        try:
            out = fn()  # type: ignore[operator]
        except (OSError, ValueError, KeyError) as exc:
            report.missing.append(f"{what}: {exc}")
            return
        if out is False:
            report.missing.append(what)
        elif isinstance(out, list):
            report.applied.extend(out)
        else:
            report.applied.append(out if isinstance(out, str) else what)

    own = uid > 0 and os.geteuid() == 0
    tasks = worker_tasks() if own else shared_tasks() if user and os.geteuid() == 0 else 0
    step("rlimits", lambda: set_rlimits(memory_bytes, tasks=tasks))
    if user or own:  # never a root worker by accident: a failed drop ends the worker (its session sees INTERNAL)
        try:
            report.applied.append(drop_user(user, uid if own else -1, groups))
        except (OSError, KeyError) as exc:
            raise RuntimeError(f"cannot run the session worker as {user!r}: {exc}") from exc
        if own:
            step("earlier processes of its uid killed", kill_uid_leftovers)
    step("not dumpable", lambda: _prctl(PR_SET_DUMPABLE, 0))  # no ptrace attach, no /proc/PID/mem by peers
    # No PDEATHSIG: a worker outlives a zygote that dies (its session goes on); it ends when the daemon closes
    # its socket (the session ends, or the daemon dies).
    step("no_new_privs", lambda: _prctl(PR_SET_NO_NEW_PRIVS, 1))
    if network:  # (without network seccomp refuses bind itself)
        step("its unix sockets named", name_unix_sockets)
    if landlock:  # (needs no_new_privs; before seccomp, whose filter would refuse nothing of it but is the last word)
        from . import landlock as _landlock

        try:
            done, lacking = _landlock.restrict(
                network=network, gpu=gpu, gpu_uuid=gpu_uuid, gpu_pci=gpu_pci, ports=ports, gloo=gloo, own=block
            )
        except OSError as exc:
            done, lacking = [], [f"landlock: {exc}"]
        report.applied.extend(done)
        report.missing.extend(lacking)
    if seccomp:
        what = "seccomp" + (" (network kept for collectives)" if network else "")
        step(what, lambda: seccomp_filter(network, shared_anonymous))
    return report
