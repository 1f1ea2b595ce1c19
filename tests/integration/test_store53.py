"""Round 53 (store53): rank > 0's store relay reads the store protocol's lengths (docs/security.md "Collectives between
daemons", server/collectives.py `_Scan`).

The store address is the tenant's to name (loopback or private, in --collective-ports): a store of the tenant's own
answered a `get` with a length of 1 GiB, and torch's TCPStore client, in rank > 0's worker (under --isolation thread the
daemon), allocated and zero-filled 1 GiB before a byte of the value came (secrev52). The relay between that client and
the store now reads each reply against the query that asked for it and closes both connections at a length past
MAX_STORE_VALUE (1 MiB), before the client reads it.
"""

from __future__ import annotations

import socket
import threading
import uuid

import torch
from gpupool.client.session import Session
from gpupool.server.collectives import (
    FRONT_ADMITTED,
    FRONT_HELLO,
    FRONT_HELLO_BYTES,
    _front_key,
    _front_mac,
    group_secret,
)
from gpupool.server.seclink import bind_in
from support import MiB

from gpupool._proto import device_pb2
from gpupool.protocol import COLLECTIVE_PORTS

_HUGE = 1 << 30


def _peak_rss() -> int:
    """This process's peak resident memory (VmHWM, bytes): the in-process daemon's, under --isolation thread."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


class _HostileStore:
    """A listener in --collective-ports that speaks torch's TCPStore protocol to one client (its constructor's
    validate, ping and add; checks and waits answered "ready") and answers its first `get` with a length of 1 GiB,
    then waits for the client's side to close (`closed`). (hole53) It first answers the join's proof of the group's
    secret as rank 0's front does (`key`: the tenant holds the lease's tokens, and so the secret)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.listener = socket.socket()
        bind_in(COLLECTIVE_PORTS, lambda port: self.listener.bind(("127.0.0.1", port)))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.answered = threading.Event()  # it sent the huge length
        self.closed = threading.Event()  # the connection it was sent on ended
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.listener:
            while True:
                try:
                    conn, _ = self.listener.accept()  # (the join's probe connects first, then the store's client)
                except OSError:
                    return
                threading.Thread(target=self._speak, args=(conn,), daemon=True).start()

    def _speak(self, conn: socket.socket) -> None:
        def take(n: int) -> bytes:
            got = b""
            while len(got) < n:
                data = conn.recv(n - len(got))
                if not data:
                    raise EOFError
                got += data
            return got

        def string() -> None:
            take(int.from_bytes(take(8), "little"))

        with conn:
            try:
                hello = take(FRONT_HELLO_BYTES)
                mine = b"\1" * 32
                nonce = hello[len(FRONT_HELLO) : len(FRONT_HELLO) + 32]  # (then its MAC: link56)
                conn.sendall(mine + _front_mac(self.key, b"front", nonce + mine))
                take(32)
                conn.sendall(FRONT_ADMITTED)
                while True:
                    query = take(1)[0]
                    if query == 0:  # validate
                        take(4)
                    elif query == 13:  # ping: its nonce back
                        conn.sendall(take(4))
                    elif query == 4:  # add
                        string()
                        conn.sendall(take(8))
                    elif query in (5, 6):  # check, wait: ready
                        for _ in range(int.from_bytes(take(8), "little")):
                            string()
                        conn.sendall(b"\0")
                    elif query == 3:  # get: a value of 1 GiB, none of whose bytes come
                        string()
                        conn.sendall(_HUGE.to_bytes(8, "little"))
                        self.answered.set()
                        while conn.recv(4096):
                            pass
                        self.closed.set()
                        return
                    else:
                        return
            except (OSError, EOFError):
                return

    def close(self) -> None:
        self.listener.close()


def test_a_store_s_huge_length_is_refused_by_rank_1_without_the_allocation(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """Rank 1 names a store of the tenant's own that answers its daemon's first `get` (rank 0's mark) with a length of
    1 GiB. The daemon's relay closes the store's connection at that length (the store sees its end), the in-process
    daemon's peak memory does not grow by it (on the base: torch's client allocated and zero-filled 1 GiB, and the
    connection stayed open until the session closed); the join fails at its deadline as at any address that is no
    store, and the session is unharmed."""
    daemon = daemon_factory(fake_gpu_memory=64 * MiB, worker_network=True, isolation="thread")
    lease = uuid.uuid4().hex
    tokens = [daemon.token(lease_id=lease, host="absent-host"), daemon.token(lease_id=lease, network=True)]
    store = _HostileStore(_front_key(group_secret(tokens[0])))
    s = Session.attach(daemon.address, tokens[1])
    try:
        before = _peak_rss()
        join = device_pb2.GroupJoin(
            rank=1, size=2, tokens=tokens, store_address=f"127.0.0.1:{store.port}", timeout_seconds=60.0
        )
        s.command(device_pb2.Command(group_join=join))
        s.sync()
        assert store.answered.wait(60), "the join never asked the store for a value"
        assert store.closed.wait(60), "the daemon kept the connection of a store that announced 1 GiB"
        grown = _peak_rss() - before
        assert grown < 256 * MiB, f"the daemon's process grew by {grown / MiB:.0f} MiB at a store's 1 GiB answer"
        assert s.download(s.upload(torch.ones(2))).tolist() == [1.0, 1.0]  # the session is unharmed
    finally:
        s.close()
        store.close()
