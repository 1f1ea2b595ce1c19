"""Each session's share of --collective-ports, and each tenant's share of the host's (round 43).

Round 42 held a worker granted network (a lease of several devices: collectives between daemons) to the ports of
`--collective-ports` under Landlock ABI 4+, but to all of them: every listener of every group of the host took a free
port of the one range, and a worker could bind any port of it itself (up to its 256 open files). So one tenant with
many groups, or one worker binding the range, left every other tenant's next group RESOURCE_EXHAUSTED.

Now each session granted network gets a block of its own, PORTS_PER_SESSION consecutive ports of the range, when its
worker starts: its groups' listeners (rank 0's store and secure hub, a rank's store relay) bind there and nowhere
else, and under Landlock ABI 4+ its worker may bind no other port (it still connects to every port of the range: its
peers' stores and hubs on other hosts). A block is held by abstract unix socket names, one a port
(`@gpupool-collective-port:PORT`): bound by the daemon that gives the block out, for the life of the session's worker,
gone with the daemon's process, and seen by every daemon of the host (the names are the network namespace's), which so
never gives out a port another daemon gave. A tenant holds at most `--collective-ports-per-tenant` ports of the host
at once (blocks of every daemon of the host, by names of its own: `@gpupool-collective-tenant:DIGEST:N`): past it a
new session granted network is RESOURCE_EXHAUSTED naming the limit, and other tenants' sessions go on.

Workers cannot bind or reach such names (seccomp refuses them unix sockets, socketpair's included; their link to the
daemon is named by the kernel before their code runs, so bind refuses it: sandbox.name_unix_sockets, round 43's
review; Landlock ABI 6 scopes abstract sockets).
Another process of the host can (any program of the host can also bind the range's TCP ports themselves): the range
is the operator's to keep for gpupool (docs/security.md).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from gpupool.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

# Ports of the range a session granted network holds (its block): a group's listeners at once are rank 0's store
# and secure hub, or a rank's store relay; the rest is room for the next group while the last one's close.
PORTS_PER_SESSION = 4
# --collective-ports-per-tenant's default: a quarter of the default range (16 sessions granted network on a host)
PORTS_PER_TENANT = 64
# How long a new session waits for closed sessions' workers to end (their blocks come free then) before it is refused
GONE_WAIT_SECONDS = 2.0
NAMES = "gpupool-collective"  # the abstract names' prefix


@dataclass
class Share:
    """A session's block of the range: (first, last) port, and the names that hold it and its tenant's part."""

    ports: tuple[int, int]
    names: list[socket.socket] = field(default_factory=list)
    pid: int = 0  # its worker, once the session closed (the block is free when that process is gone)


class PortShares:
    """Gives out the blocks of `ports` (--collective-ports: LOW, HIGH) to a daemon's sessions granted network, at most
    `per_tenant` ports of the host to one tenant (0: no bound but the range's)."""

    def __init__(self, ports: tuple[int, int], per_tenant: int = PORTS_PER_TENANT, names: str = NAMES) -> None:
        low, high = ports
        self.range = (low, high)
        self.per_session = min(PORTS_PER_SESSION, high - low + 1)
        if per_tenant and per_tenant < self.per_session:
            raise InvalidArgument(
                f"--collective-ports-per-tenant {per_tenant}: a session granted network holds {self.per_session} "
                "ports of --collective-ports; give each tenant at least that (or 0: no share)"
            )
        self.per_tenant = per_tenant
        self.blocks = [(b, b + self.per_session - 1) for b in range(low, high - self.per_session + 2, self.per_session)]
        self.names = names
        self._lock = threading.Lock()
        self._next = 0  # the block the next take tries first (in turn through the range)
        self._live: list[Share] = []
        self._done: list[Share] = []  # closed sessions' blocks whose workers may still live

    def take(self, tenant: str) -> Share:
        """A block for a new session of `tenant`; ResourceExhausted naming the limit where the tenant holds its share
        of the host's ports or every block is held (after waiting up to GONE_WAIT_SECONDS for closed sessions'
        workers to end, where there are such)."""
        deadline = time.monotonic() + GONE_WAIT_SECONDS
        while True:
            with self._lock:
                self._sweep()
                share, why = self._try(tenant)
                if share is not None:
                    self._live.append(share)
                    return share
                waiting = bool(self._done)
            if not waiting or time.monotonic() >= deadline:
                raise ResourceExhausted(why)
            time.sleep(0.02)

    def give_back(self, share: Share, pid: int) -> None:
        """The session holding `share` ended; its worker `pid` (0: none, or its own thread) may still run: the block
        is free once that process is gone."""
        with self._lock:
            self._live = [s for s in self._live if s is not share]
            if pid > 0 and os.path.exists(f"/proc/{pid}"):
                share.pid = pid
                self._done.append(share)
            else:
                _close(share.names)

    def close(self) -> None:
        """The daemon stops: every block it gave out is free (its workers are killed with their sessions)."""
        with self._lock:
            for share in self._live + self._done:
                _close(share.names)
            self._live.clear()
            self._done.clear()

    def held(self) -> list[tuple[int, int]]:
        """The blocks this daemon holds (its live sessions', and closed ones' whose workers still run)."""
        with self._lock:
            return [s.ports for s in self._live + self._done]

    def _sweep(self) -> None:
        for share in [s for s in self._done if not os.path.exists(f"/proc/{s.pid}")]:
            self._done.remove(share)
            _close(share.names)

    def _try(self, tenant: str) -> tuple[Share | None, str]:
        low, high = self.range
        names: list[socket.socket] = []
        if self.per_tenant:
            digest = hashlib.sha256(b"gpupool-collective-tenant:" + tenant.encode()).hexdigest()[:32]
            for n in range(self.per_tenant // self.per_session):
                name = _hold(f"{self.names}-tenant:{digest}:{n}")
                if name is not None:
                    names.append(name)
                    break
            else:
                return None, (
                    f"this tenant's sessions granted network (collectives between daemons) hold "
                    f"{self.per_tenant // self.per_session * self.per_session} ports of --collective-ports {low}-{high}"
                    f" on this host, its share (--collective-ports-per-tenant {self.per_tenant}; {self.per_session} a "
                    "session): close one of them, or ask the operator for a larger share"
                )
        count = len(self.blocks)
        for k in range(count):
            i = (self._next + k) % count
            first, last = self.blocks[i]
            held = []
            for port in range(first, last + 1):
                name = _hold(f"{self.names}-port:{port}")
                if name is None:
                    break
                held.append(name)
            else:
                self._next = (i + 1) % count
                return Share((first, last), names + held), ""
            _close(held)
        _close(names)
        return None, (
            f"every port of --collective-ports {low}-{high} is held by sessions granted network on this host "
            f"({count} blocks of {self.per_session}): try again later (the operator widens the range)"
        )


def _hold(name: str) -> socket.socket | None:
    """`name` bound as an abstract unix socket (held while the socket lives), or None where something holds it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind("\0" + name)
    except OSError as exc:
        s.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return s


def _close(names: list[socket.socket]) -> None:
    for s in names:
        s.close()
