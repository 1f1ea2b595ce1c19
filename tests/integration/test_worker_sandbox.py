"""What a session's worker can reach when a tenant runs code in it (a memory-safety bug in a kernel): real workers,
forked and confined by a real zygote as a daemon's are, run the probes of worker_attacks.py after their sandbox
(server/sandbox.py) is in place. As root, so that the workers drop to `nobody` as a root daemon's do: every worker of
the host shares that user, so the sandbox is what keeps them apart."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import worker_attacks
from gpupool.server.worker import DATA_AT, SHARED_BYTES, ProcessRunner, WorkerSpec
from gpupool.server.zygote import Zygote

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="workers drop to an unprivileged user only as root")
MiB = 1024**2


# Credentials in the daemon's environment when it starts its zygote (a token, a cloud key): no worker may see them.
ENV_SECRETS = {"GPUPOOL_API_TOKEN": "gpupool-token-in-env", "AWS_SECRET_ACCESS_KEY": "aws-secret-in-env",
               "HF_TOKEN": "hf-token-in-env", "DB_PASSWORD": "db-password-in-env"}  # fmt: skip


STDERR = Path(tempfile.gettempdir()) / f"gpupool-sandbox-zygote-{os.getpid()}.log"  # the daemon's stderr, a file


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote(program=[sys.executable, worker_attacks.__file__, "--stderr", str(STDERR)])
    saved = {k: os.environ.get(k) for k in ENV_SECRETS}
    os.environ.update(ENV_SECRETS)
    try:
        z.start()
        z.wait_ready()  # (launched: the zygote's environment is set)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield z
    finally:
        z.stop()
        STDERR.unlink(missing_ok=True)


def spec(session_id: str, **kw: Any) -> WorkerSpec:
    fields: dict[str, Any] = {
        "session_id": session_id,
        "number": 1,
        "device": {"index": 0, "uuid": "fake-0", "model": "fake", "memory_bytes": 1 << 30, "fake": True},
        "quota": 64 * MiB,
        "max_handles": 1000,
        "max_op_flops": 0,
        "memory_limit": 64 * MiB + 1024 * MiB,
        "cpu_threads": 1,
        "user": "nobody",
        "seccomp": True,
    }
    return WorkerSpec(**{**fields, **kw})


def attack(z: Zygote, probes: list[str], ctx: dict[str, Any], **kw: Any) -> tuple[ProcessRunner, dict[str, str]]:
    """A worker that runs `probes` once confined; what each got."""
    runner = z.spawn(spec(worker_attacks.PREFIX + json.dumps({"probes": probes, "ctx": ctx}), **kw), MiB)
    return runner, worker_attacks.read_report(runner._sock)


@pytest.fixture
def host_files() -> Iterator[dict[str, str]]:
    """A root-only file (a token key, a TLS key), a file and a folder of the workers' user, a readable file (in a
    folder of their own that the workers' user may enter: pytest's tmp_path is root's only)."""
    nobody = pwd.getpwnam("nobody")
    tmp_path = Path(tempfile.mkdtemp(prefix="gpupool-sandbox-"))
    tmp_path.chmod(0o755)
    secret = tmp_path / "secret"
    secret.write_text("a key")
    secret.chmod(0o600)
    owned = tmp_path / "nobody-file"
    owned.write_text("the user's data")
    os.chown(owned, nobody.pw_uid, nobody.pw_gid)
    readable = tmp_path / "readable"
    readable.write_text("anyone may read this")
    readable.chmod(0o644)
    folder = tmp_path / "nobody-folder"
    folder.mkdir()
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    yield {"secret_file": str(secret), "nobody_file": str(owned), "readable_file": str(readable),
           "writable_dir": str(folder)}  # fmt: skip
    shutil.rmtree(tmp_path)


HOST_PROBES = [
    "victim_proc", "process_vm_readv", "shared_buffers", "read_secret", "create_file", "truncate_readonly",
    "metadata", "stdio", "sockets", "io_uring", "aio", "kernel_interfaces", "signal_victim", "sigio_kill",
    "other_process_settings", "ipc", "locks", "shared_anonymous", "environment", "unreviewed_calls",
]  # fmt: skip


def test_a_workers_code_reaches_no_other_worker_nor_the_host(zygote: Zygote, host_files: dict[str, str]) -> None:
    """Round 38 found, from a worker on 285a6ed: another worker killed (a pipe's SIGIO owner set to it, F_SETSIG
    SIGKILL), signalled (rt_sigqueueinfo), its limits, priority, affinity and scheduling changed; a file of the
    workers' user truncated (O_RDONLY | O_TRUNC) and its metadata changed (utime, fchmodat2, setxattr); io_uring
    and AIO contexts (io_uring opens files and sockets past seccomp), secret memory, System V IPC objects and POSIX
    queues (outliving the worker), file locks on a file it may only read, and 256 MiB of shared anonymous memory
    past its RLIMIT_DATA, and the daemon's environment's credentials (its API token, a cloud key) in the
    worker's own environment. Each is refused now; what held then holds still (other workers' memory and descriptors,
    root-only files, sockets, ptrace, BPF, userfaultfd, perf, keyrings, namespaces, mounts, exec)."""
    victim = zygote.spawn(spec("victim"), MiB)
    sacrificial = zygote.spawn(spec("sacrificial"), MiB)
    secret = os.urandom(16)
    victim._progress[DATA_AT : DATA_AT + 16] = secret  # what the front put in the victim's shared buffer
    ctx = {**host_files, "victim": victim.pid, "sacrificial": sacrificial.pid, "secret": secret.hex(),
           "shared_anon_bytes": 256 * MiB, "env_secrets": list(ENV_SECRETS.values())}  # fmt: skip
    attacker, got = attack(zygote, HOST_PROBES, ctx, memory_limit=128 * MiB)
    try:
        reached = {name: outcome for name, outcome in got.items() if not outcome.startswith("blocked")}
        assert not reached, reached
        assert os.stat(host_files["nobody_file"]).st_size > 0
        time.sleep(0.2)  # (a signal sent would have landed by now)
        assert victim.alive() and sacrificial.alive() and attacker.alive()
        assert bytes(victim._progress[DATA_AT : DATA_AT + 16]) == secret
    finally:
        for runner in (attacker, victim, sacrificial):
            runner.close()


@pytest.mark.parametrize("seccomp", [True, False])
def test_a_worker_cannot_resize_its_shared_buffer_under_the_daemon(zygote: Zygote, seccomp: bool) -> None:
    """The worker holds a descriptor of its shared buffer's memory file (Python's mmap keeps a duplicate). On 285a6ed
    it could ftruncate the file to 0, and the daemon's next copy into its mapping of the buffer died of SIGBUS (the
    whole daemon, every session). The daemon seals the file's size now (F_SEAL_SHRINK | F_SEAL_GROW), which holds
    with the worker's seccomp filter off too; the filter refuses ftruncate besides."""
    runner, got = attack(zygote, ["shrink_shared"], {}, seccomp=seccomp)
    try:
        assert got["shrink_shared"].startswith("blocked: ['EPERM']"), got
        assert runner._progress.size() == SHARED_BYTES  # the file's size, as the daemon's mapping sees it
        runner._data[:4] = b"live"  # the daemon's copy into the buffer: no SIGBUS
        assert runner.alive()
    finally:
        runner.close()


def test_a_workers_descriptors_are_its_own(zygote: Zygote) -> None:
    """Pins what held on 285a6ed: besides stdin, stdout, stderr and its session socket, a worker holds its own shared
    buffer's file and the native runner's module (loaded as opened), nothing of another worker, the zygote or the
    daemon."""
    others = [zygote.spawn(spec(f"other-{k}"), MiB) for k in range(2)]
    runner, got = attack(zygote, ["fds"], {})
    try:
        held = got["fds"]
        if held.startswith("open: "):
            targets = [entry.split(" -> ", 1)[1] for entry in json.loads(held[6:].replace("'", '"'))]
            assert [t for t in targets if t.startswith("/memfd:")] == ["/memfd:gpupool-shared (deleted)"], targets
            assert all(t.startswith("/memfd:") or t.endswith(".so") for t in targets), targets
    finally:
        for r in (runner, *others):
            r.close()


UIDS = 3_141_590_000  # the first of this file's worker uids (no account of a host is there)


def test_workers_with_uids_of_their_own_are_kept_apart_by_the_kernel_and_bounded_in_threads(zygote: Zygote) -> None:
    """`--worker-uids`: a uid of its own for each worker. With its seccomp filter off, a worker of another uid can
    neither signal nor retune the victim (the kernel's same-user checks: on 285a6ed, with one user for all workers,
    seccomp was all that refused them), and RLIMIT_NPROC bounds its threads (on 285a6ed a worker started threads up
    to the host's pid_max, 32,768 here, which the daemon and the zygote need too: every worker shared one count)."""
    from gpupool.server.sandbox import worker_tasks

    victim = zygote.spawn(spec("victim", uid=UIDS + 1), MiB)
    sacrificial = zygote.spawn(spec("sacrificial", uid=UIDS + 2), MiB)
    ctx = {"victim": victim.pid, "sacrificial": sacrificial.pid, "threads": worker_tasks() + 64}
    probes = ["signal_victim", "sigio_kill", "other_process_settings", "victim_proc", "threads"]
    attacker, got = attack(zygote, probes, ctx, uid=UIDS + 3, seccomp=False)
    try:
        reached = {name: outcome for name, outcome in got.items() if not outcome.startswith("blocked")}
        assert not reached, reached
        assert f"(RLIMIT_NPROC {worker_tasks()})" in got["threads"]
        with open(f"/proc/{attacker.pid}/status") as f:
            ids = {line.split(":")[0]: line.split()[1:] for line in f if line.startswith(("Uid", "Gid", "Groups"))}
        assert ids == {"Uid": [str(UIDS + 3)] * 4, "Gid": [str(UIDS + 3)] * 4, "Groups": []}, ids
        time.sleep(0.2)
        assert victim.alive() and sacrificial.alive() and attacker.alive()
    finally:
        for runner in (attacker, victim, sacrificial):
            runner.close()


def test_a_thread_bomb_of_a_worker_sharing_its_user_is_bounded(zygote: Zygote) -> None:
    """`--worker-uids off` (or a default range the host uses): workers share `nobody`. On the base such a worker had
    no RLIMIT_NPROC and started threads up to the host's pid_max (32,768 here); now the user's tasks together are
    bounded by `shared_tasks` (at most half of pid_max: the daemon, root, and the host keep the rest)."""
    from gpupool.server.sandbox import shared_tasks

    bound = shared_tasks()
    attacker, got = attack(zygote, ["threads"], {"threads": bound + 64}, seccomp=False)
    try:
        assert got["threads"].startswith("blocked") and f"(RLIMIT_NPROC {bound})" in got["threads"], got
        with open("/proc/sys/kernel/pid_max") as f:
            assert bound <= int(f.read()) // 2
        assert attacker.alive()
    finally:
        attacker.close()


def test_a_workers_output_reaches_the_daemons_log_marked_printable_and_bounded(zygote: Zygote) -> None:
    """On 285a6ed a worker's stdout and stderr were the daemon's: 4 MiB of forged log lines with terminal escapes went
    into the daemon's log file as written (and the file could be truncated: seccomp refuses that now). The zygote
    now reads each worker's output from a pipe and writes it on as lines naming the worker, control characters
    escaped, at most 256 KiB at once and 4 KiB a second per worker."""
    from gpupool.server.zygote import WorkerOutput

    before = STDERR.stat().st_size
    flood = 4 * MiB
    runner, got = attack(zygote, ["flood_stderr", "stdio"], {"flood_bytes": flood})
    try:
        assert got["flood_stderr"].startswith("wrote"), got
        assert got["stdio"].startswith("blocked"), got
        time.sleep(0.5)  # (the zygote forwards as the pipe fills)
        with STDERR.open("rb") as f:
            f.seek(before)
            log = f.read()
        forged = [line for line in log.split(b"\n") if b"forged line" in line]
        assert forged, log[-2000:]
        assert len(b"\n".join(forged)) < WorkerOutput.BURST_BYTES + 64 * 1024, len(b"\n".join(forged))
        assert all(line.startswith(f"gpupool-worker {runner.pid}: ".encode()) for line in forged), forged[:2]
        assert b"\x1b" not in log and b"\r" not in log and b"\x07" not in log
        assert runner.alive()
    finally:
        runner.close()


def test_a_rampaging_worker_of_a_real_daemon_ends_only_its_own_session(zygote: Zygote, daemon_factory: Any) -> None:
    """A real daemon whose zygote is this file's: the worker of the lease `attack-rampage-...` tries, once confined,
    every way it has to end or cripple the zygote's other children (SIGIO owner, rt_sigqueueinfo, kill, prlimit64),
    then answers its first slice with junk (a result of an impossible length). On 285a6ed the SIGIO owner killed the
    other tenant's worker (its session failed); now that tenant's tensors are intact, the attacker's session ends
    with an error, and the daemon serves new sessions."""
    import uuid

    import torch
    from gpupool.client.session import Session
    from gpupool.server import zygote as zygote_module

    from gpupool import errors

    saved = zygote_module._shared
    zygote_module._shared = zygote  # the daemon's zygote (shared_zygote) is this file's
    try:
        d = daemon_factory()
        victim = Session.attach(d.address, d.token(quota_bytes=16 * MiB))
        kept = victim.upload(torch.arange(6.0))
        victim.sync()
        attacker = Session.attach(
            d.address, d.token(lease_id=f"attack-rampage-{uuid.uuid4().hex}", quota_bytes=16 * MiB)
        )
        with pytest.raises(errors.GpupoolError):
            attacker.download(attacker.upload(torch.ones(2)))
        attacker.close()
        assert victim.download(kept).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        late = Session.attach(d.address, d.token(quota_bytes=16 * MiB))
        assert late.download(late.upload(torch.arange(3.0))).tolist() == [0.0, 1.0, 2.0]
        late.close()
        victim.close()
    finally:
        zygote_module._shared = saved


def test_a_workers_memory_holds_no_other_sessions_id(zygote: Zygote, daemon_factory: Any) -> None:
    """A session id is a bearer credential (Stream and Detach take it alone). On 50464ae the daemon sent each session's
    id to the zygote in its worker's spec, the zygote's memory kept those messages (freed or not), and every worker
    forked later inherits that memory: a tenant's code in its worker found 2 of 3 earlier sessions' ids in its own heap
    (a read no sandbox can refuse) and could return them to its client, which could then end those sessions (Detach).
    The daemon now sends the session's public tag (tokens.public_session_id) instead."""
    import json as json_module

    import torch
    from gpupool.client.session import Session
    from gpupool.server import zygote as zygote_module

    saved = zygote_module._shared
    zygote_module._shared = zygote  # the daemon's zygote (shared_zygote) is this file's
    try:
        d = daemon_factory()
        victims = [Session.attach(d.address, d.token(quota_bytes=16 * MiB)) for _ in range(3)]
        for v in victims:
            v.download(v.upload(torch.arange(3.0)))  # (their workers serve)
        ids = [v.session_id for v in victims]
        assert all(len(i) == 24 for i in ids), ids
        before = STDERR.stat().st_size
        lease = worker_attacks.MEMSCAN + ".".join(i[:6] for i in ids)
        attacker = Session.attach(d.address, d.token(lease_id=lease, quota_bytes=16 * MiB))
        attacker.download(attacker.upload(torch.ones(2)))  # (its worker has scanned: it serves after)
        found = None
        deadline = time.monotonic() + 30
        while found is None and time.monotonic() < deadline:
            with STDERR.open("rb") as f:
                f.seek(before)
                said = re.search(rb"memscan \d+: (\[.*?\])", f.read())
            found = json_module.loads(said.group(1)) if said else None
            time.sleep(0.1)
        assert found is not None, "the attacking worker said nothing"
        assert not set(found) & set(ids), found
        attacker.close()
        for v in victims:
            v.close()
    finally:
        zygote_module._shared = saved


def test_a_worker_granted_network_gets_tcp_only(zygote: Zygote) -> None:
    """A worker whose lease grants network (collectives between daemons) keeps TCP sockets. On 285a6ed it kept every
    socket family: it connected to the host's abstract unix socket (any local service that trusts its local peers),
    and could open netlink and AF_ALG sockets; now only AF_INET and AF_INET6 (sandbox.NETWORK_FAMILIES)."""
    import socket
    import uuid

    name = f"gpupool-sandbox-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as service:
        service.bind("\0" + name)
        service.listen(4)
        runner, got = attack(zygote, ["socket_families"], {"abstract": name}, network=True)
        try:
            assert got["socket_families"].startswith("blocked"), got
        finally:
            runner.close()


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_a_worker_granted_network_binds_its_sessions_block_of_the_range_only(zygote: Zygote, transport: str) -> None:
    """Round 42 let a worker granted network bind every port of --collective-ports (Landlock ABI 4+): one worker
    binding the range (up to its 256 open files) left every other group of the host RESOURCE_EXHAUSTED. Since round
    43 it binds only its session's block of the range (WorkerSpec.collective_share: the daemon's
    server/portshare.py gives each session granted network 4 ports of its own), under both transports; on 7b5ed4d a
    spec had no block and the worker bound every free port of the range."""
    from gpupool.server import landlock

    from gpupool.protocol import COLLECTIVE_PORTS

    if landlock.abi() < 4:
        pytest.skip("TCP rules need Landlock ABI 4 (Linux 6.7)")
    block = (COLLECTIVE_PORTS[0] + 8, COLLECTIVE_PORTS[0] + 11)
    runner, got = attack(zygote, ["bind_range"], {"range": COLLECTIVE_PORTS}, network=True, collectives=transport,
                         collective_share=block)  # fmt: skip
    runner.close()
    report = json.loads(got["bind_range"][len("report: ") :])
    assert report["bound"] and set(report["bound"]) <= set(range(block[0], block[1] + 1)), report
    assert report["refused"].get("EACCES", 0) >= COLLECTIVE_PORTS[1] - COLLECTIVE_PORTS[0] + 1 - 4 - 16, report


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_a_worker_granted_network_sends_no_udp_and_still_looks_names_up(zygote: Zygote, transport: str) -> None:
    """A worker granted network sent UDP datagrams to any port of any host (Landlock has no UDP rules) and opened
    ICMP ping sockets (round 42 left both: bench/worker_reach.py's "send UDP" row); on 7b5ed4d the datagram below
    arrived. Now its IPv4 and IPv6 sockets are TCP only (seccomp: sandbox.SOCK_STREAM), its resolver asks over TCP
    (RES_OPTIONS use-vc from the zygote's environment: port 53 is in its Landlock rules), and a name of the hosts
    file still resolves."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as service:
        service.bind(("127.0.0.1", 0))
        service.settimeout(1.0)
        runner, got = attack(zygote, ["udp"], {"udp_port": service.getsockname()[1]}, network=True,
                             collectives=transport)  # fmt: skip
        runner.close()
        try:
            arrived = service.recv(64)
        except TimeoutError:
            arrived = b""
    report = json.loads(got["udp"][len("report: ") :])
    assert arrived == b"" and report["udp"] == "blocked EPERM" and report["ping"] == "blocked EPERM", (arrived, report)
    assert "127.0.0.1" in report["localhost"] and "use-vc" in report["RES_OPTIONS"].split(), report


def test_a_zygote_whose_stderr_pipe_is_never_read_still_spawns_workers(tmp_path: Path) -> None:
    """The daemon's stderr a pipe nobody reads (a parent that started `gpupool serve` with stderr=PIPE): workers'
    output past what the pipe holds is dropped and counted, never waited on, and the next worker still starts. On
    the base the zygote's forwarding write blocked on the full pipe, and with it every spawn (the zygote did not
    answer). Half the pipe stays free for the daemon's own lines; the drop is said once the pipe is read again."""
    from gpupool.server.zygote import WorkerOutput

    fifo = tmp_path / "stderr"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open, not read until the end
    z = Zygote(program=[sys.executable, worker_attacks.__file__, "--stderr", str(fifo)])
    try:
        z.start()
        z.wait_ready()
        flood = WorkerOutput.BURST_BYTES  # forwarded at once: four times what a pipe holds
        runner, got = attack(z, ["flood_stderr"], {"flood_bytes": flood})
        assert got["flood_stderr"].startswith("wrote"), got
        time.sleep(1.0)  # (the zygote forwards as the worker's pipe fills)
        for _ in range(3):
            other, got = attack(z, ["flood_stderr"], {"flood_bytes": 64 * 1024})
            assert got["flood_stderr"].startswith("wrote"), got
            assert other.alive()
            other.close()
        held = os.read(reader, 1 << 20)
        assert 0 < len(held) <= 32 * 1024, len(held)  # half the pipe: the rest is the daemon's own lines' room
        last, got = attack(z, ["flood_stderr"], {"flood_bytes": 1024})
        said, deadline = b"", time.monotonic() + 30
        while b"gpupool-zygote: " not in said and time.monotonic() < deadline:  # (once the zygote forwards again)
            time.sleep(0.1)
            try:
                said += os.read(reader, 1 << 20)
            except BlockingIOError:
                pass
        assert re.search(rb"gpupool-zygote: \d+ bytes of workers' output dropped", said), said[:500]
        # whole lines, in order (the last may be cut by the pipe's half: its rest goes first on the next write)
        assert all(re.match(rb"gpupool-(worker \d+|zygote): ", line) for line in (held + said).split(b"\n") if line)
        runner.close()
        last.close()
    finally:
        z.stop()
        os.close(reader)


@pytest.fixture
def daemon_files() -> Iterator[list[str]]:
    """A TLS key and an API token file of the daemon's user (here root: a worker that keeps the daemon's user, as a
    non-root daemon's do, may read them by their permissions), in a folder of that user's only."""
    folder = Path(tempfile.mkdtemp(prefix="gpupool-daemon-"))
    folder.chmod(0o700)
    key, token = folder / "server.key", folder / "api-token"
    key.write_text("-----BEGIN PRIVATE KEY-----\nthe daemon's TLS key\n-----END PRIVATE KEY-----\n")
    token.write_text("the daemon's API token\n")
    for path in (key, token):
        path.chmod(0o600)
    yield [str(key), str(token)]
    shutil.rmtree(folder)


@pytest.mark.parametrize("landlock", [True, False])
def test_a_worker_of_the_daemons_own_user_cannot_read_the_daemons_key(
    zygote: Zygote, daemon_files: list[str], landlock: bool
) -> None:
    """A non-root daemon's workers keep its user (here `--worker-user keep`: the same uid as the daemon's): on
    1344c19 a worker read the daemon's TLS key and API token file, which its permissions allow. Landlock
    (server/landlock.py) lets a worker read Python's, torch's and the libraries' files only: refused now, and read
    again only with the operator's opt-out (`--landlock off`)."""
    runner, got = attack(zygote, ["read_daemon_files"], {"daemon_files": daemon_files}, user="", landlock=landlock)
    try:
        if landlock:
            assert got["read_daemon_files"].startswith("blocked"), got
        else:
            assert got["read_daemon_files"] == f"open: read {daemon_files}", got
        assert runner.alive()
    finally:
        runner.close()


@pytest.mark.parametrize("seccomp", [True, False])
def test_a_worker_writes_no_file_and_connects_to_no_port_without_the_network_grant(
    zygote: Zygote, seccomp: bool
) -> None:
    """With its seccomp filter off (a host without libseccomp, `--seccomp off`), a worker keeping the daemon's user
    on 1344c19 made a file in /tmp and connected to a loopback port (the daemon's own, the scheduler's, any local
    service's). Landlock refuses both by itself now: no file may be written anywhere, no TCP port bound or connected
    to without the network grant. (With the filter on, which refuses both too, this pins what held.)"""
    import socket

    with socket.socket() as service:
        service.bind(("127.0.0.1", 0))
        service.listen(4)
        ctx = {"port": service.getsockname()[1], "tmp": tempfile.gettempdir()}
        runner, got = attack(zygote, ["write_tmp", "connect_loopback"], ctx, user="", seccomp=seccomp)
        try:
            assert got["write_tmp"].startswith("blocked"), got
            assert got["connect_loopback"].startswith("blocked"), got
            assert not list(Path(tempfile.gettempdir()).glob(f"gpupool-worker-{runner.pid}"))
        finally:
            runner.close()


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_a_worker_granted_network_connects_in_its_collective_ports_only(zygote: Zygote, transport: str) -> None:
    """A worker whose lease grants network (collectives between daemons) connects to the ports of its daemon's
    --collective-ports (its peers' stores and hubs: here the default range), and under Landlock ABI 4+ to no other
    TCP port: on ca5fb68 it connected to any (round 41's audit: the daemon's and the scheduler's loopback ports
    included; a listener on a port the kernel picked stands in for them). Under `--collectives gloo` it still
    connects anywhere (gloo's pairs dial the ports their peers' kernels picked)."""
    import socket

    from gpupool.server import landlock
    from gpupool.server.seclink import bind_in

    from gpupool.protocol import COLLECTIVE_PORTS

    inside = bind_in(COLLECTIVE_PORTS, lambda port: socket.create_server(("127.0.0.1", port)))
    with inside, socket.create_server(("127.0.0.1", 0)) as daemon_port:
        got = {}
        for name, service in (("inside", inside), ("outside", daemon_port)):
            ctx = {"port": service.getsockname()[1]}
            runner, report = attack(zygote, ["connect_loopback"], ctx, network=True, collectives=transport)
            runner.close()
            got[name] = report["connect_loopback"].split(":")[0]
    narrowed = landlock.abi() >= 4 and transport == "secure"
    assert got == {"inside": "open", "outside": "blocked" if narrowed else "open"}, got


def test_a_worker_signals_no_process_and_reaches_no_abstract_socket_outside_it(zygote: Zygote) -> None:
    """With its seccomp filter off, a worker keeping the daemon's user on 1344c19 signalled a process of that user
    (signal 0: the permission check; a real signal, or ptrace, goes as far) and connected to the host's abstract unix
    socket. Landlock's scopes (ABI 6) refuse both by themselves now."""
    import socket
    import subprocess
    import uuid

    from gpupool.server import landlock

    if landlock.abi() < 6:
        pytest.skip("Landlock scopes need ABI 6 (Linux 6.12)")
    name = f"gpupool-sandbox-{uuid.uuid4().hex}"
    victim = subprocess.Popen(["sleep", "300"])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as service:
        service.bind("\0" + name)
        service.listen(4)
        ctx = {"victim": victim.pid, "abstract": name}
        runner, got = attack(zygote, ["signal_victim", "abstract_unix"], ctx, user="", seccomp=False)
        try:
            assert got["signal_victim"].startswith("blocked"), got
            assert got["abstract_unix"].startswith("blocked"), got
            assert victim.poll() is None
        finally:
            runner.close()
            victim.kill()
            victim.wait()


def test_a_worker_that_never_reads_its_socket_does_not_outlive_its_daemon() -> None:
    """A worker blocked in tenant code (it never reads its session socket again) and a daemon that stops (here
    `Zygote.stop`, as `gpupool serve` does at its exit; a daemon killed outright ends the same thread): the zygote's
    workers die with it. On the merged round 39 tree before fin39 (and on 1344c19) the zygote's death signal
    (PR_SET_PDEATHSIG) was SIGKILL, which landed before the zygote read the end of its control socket and killed
    its workers: the worker lived on as an orphan, with its memory, its uid and its code running."""
    z = Zygote(program=[sys.executable, worker_attacks.__file__, "--stderr", str(STDERR)])
    z.start()
    z.wait_ready()
    pid = 0
    try:
        runner = z.spawn(spec(worker_attacks.PREFIX + json.dumps({"probes": ["hang"], "ctx": {}})), MiB)
        pid = runner.pid
        time.sleep(1.0)  # (confined and in the probe; it sends nothing)
        assert _running(pid)
    finally:
        z.stop()
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _running(pid)
    if alive:
        os.kill(pid, 9)  # (the test's own cleanup: an orphan is reaped by init)
    assert not alive, f"worker {pid} outlived its zygote and daemon"


def _running(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_a_worker_granted_network_opens_no_other_stream_protocol_and_no_unix_socket(
    zygote: Zygote, transport: str
) -> None:
    """Round 43's review, from a worker granted network on 5c01be9: an MPTCP stream socket (socket(AF_INET,
    SOCK_STREAM, IPPROTO_MPTCP): a SOCK_STREAM, which the TCP-only rule let through, and not TCP, which Landlock's
    port rules hold) connected to a TCP port of the host outside --collective-ports; socketpair made unix sockets,
    which sent a datagram to a unix socket file of the host (as /dev/log) and bound an abstract name (the names that
    hold a daemon's --collective-ports, server/portshare.py); and the worker's own link to its daemon bound one too.
    Now its stream sockets are TCP's (sandbox.IPPROTO_TCP), socketpair is refused, and its unix sockets are named by
    the kernel before its code runs (sandbox.name_unix_sockets), so bind refuses them."""
    import socket
    import uuid

    folder = Path(tempfile.mkdtemp(prefix="gpupool-sandbox-"))
    folder.chmod(0o755)
    path = str(folder / "service")
    squat = f"gpupool-collective-port:{uuid.uuid4().hex}"
    try:
        with socket.socket() as tcp, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as service:
            tcp.bind(("127.0.0.1", 0))
            tcp.listen(4)
            service.bind(path)
            os.chmod(path, 0o777)
            service.settimeout(1.0)
            ctx = {"tcp_port": tcp.getsockname()[1], "squat": squat, "unix_path": path}
            runner, got = attack(zygote, ["net_escapes"], ctx, network=True, collectives=transport,
                                 collective_share=(29500, 29503))  # fmt: skip
            runner.close()
            try:
                arrived = service.recv(64)
            except TimeoutError:
                arrived = b""
    finally:
        shutil.rmtree(folder)
    report = json.loads(got["net_escapes"][len("report: ") :])
    assert arrived == b"", (arrived, report)
    assert report["mptcp"].startswith("blocked") and report["sctp"].startswith("blocked"), report
    assert report["socketpair_bind"].startswith("blocked") and report["unix_datagram"].startswith("blocked"), report
    assert report["inherited"] and "bound" not in report["inherited"], report
