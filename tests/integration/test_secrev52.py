"""Round 52 review (secrev52): data parallelism's collectives and the scheduler's inputs, attacked as a stranger on the
hosts' network or a tenant would, on real daemons (docs/security.md "Round 52 review (secrev52)").

Rank 0's group store (torch's TCPStore) listened on every interface of its host whatever address the daemon was
given: a daemon of `gpupool up` (127.0.0.1) had its groups' stores open to every network of the machine, where anyone
wrote values into them (up to 8 MiB each, any number of keys: rank 0's worker's memory, the daemon's under --isolation
thread) or deleted them. It now listens on the daemon's peer-facing host only, as the secure hub does. (hole53) And
there it forwards to the store only a connection that proves the group's secret. (front54) And what such a connection
sets is bounded, and a stranger's silent connections hold no rank's handshake out.
"""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from gpupool.client.session import Session
from gpupool.server.collectives import (
    MAX_FRONT_FLYING,
    MAX_FRONT_KEYS,
    MAX_FRONT_PENDING,
    MAX_STORE_BYTES,
    MAX_STORE_VALUE,
    _connect_store,
    _front_key,
    _prove,
    group_secret,
)
from support import MiB
from test_store53 import _peak_rss

from gpupool._proto import device_pb2


def _store_port(s: Session, tokens: list[str]) -> int:
    """Join `s` as rank 0 of a group of two (its rank 1 never comes): the port of the store its daemon opened."""
    h = s.new_handle()
    join = device_pb2.GroupJoin(rank=0, size=2, tokens=tokens, port_handle=h, timeout_seconds=60.0)
    s.command(device_pb2.Command(group_join=join))
    (port,) = s.sync([h])
    return int(port)


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=30).close()
    except ConnectionRefusedError:
        return False
    return True


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # (closed with bytes unread)
        return True


_VALIDATE = 0x3C85F7CE  # torch 2.13's TCPStore's first query (`validate`), its magic number


def _set(key: bytes, value: bytes) -> bytes:
    """A TCPStore `set` query (torch 2.13's protocol: type 1, key and value each after its 8-byte length; a key of
    torch's client is "/" and the key it is given)."""
    return b"\x01" + len(key).to_bytes(8, "little") + key + len(value).to_bytes(8, "little") + value


def _keyed(port: int, key: bytes, source: str = "") -> socket.socket:
    """A connection to rank 0's front that proved the group's secret (as a holder of the lease's tokens can)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0) if source else None)
    _prove(sock, key, time.monotonic() + 30)
    sock.sendall(b"\0" + _VALIDATE.to_bytes(4, "little"))  # (the store answers nothing else before it)
    sock.settimeout(60)
    return sock


def _sent_or_closed(sock: socket.socket, data: bytes) -> bool:
    """Send `data`: whether the front closed the connection meanwhile."""
    try:
        sock.sendall(data)
    except OSError:
        return True
    return False


def _send_closed(sock: socket.socket, data: bytes) -> bool:
    """Send `data` (the front may close the connection meanwhile) and whether the front then closed it."""
    try:
        sock.sendall(data)
    except OSError:  # (closed while we wrote)
        return True
    return _closed(sock)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_rank_0s_store_listens_on_its_daemons_own_address_only(daemon_factory, isolation: str) -> None:  # type: ignore[no-untyped-def]
    """A daemon on 127.0.0.1: its group's store answers there, and on no other address of the host (127.0.0.2 stands
    for the host's other networks: on the base, torch's TCPStore bound every interface, and it answered)."""
    d = daemon_factory(fake_gpu_memory=64 * MiB, worker_network=True, isolation=isolation)
    lease = uuid.uuid4().hex
    tokens = [d.token(lease_id=lease, network=True), d.token(lease_id=lease, host="absent-host")]
    s = Session.attach(d.address, tokens[0])
    try:
        port = _store_port(s, tokens)
        assert _connects("127.0.0.1", port)  # the daemon's own address: the ranks' way in
        assert not _connects("127.0.0.2", port), f"rank 0's store on port {port} answers on 127.0.0.2"
        with pytest.raises(OSError):
            socket.create_connection(("::1", port), timeout=30).close()  # nor IPv6 (it was dual-stack)
        # (hole53) on its own address it forwards nothing of a connection that does not prove the group's secret: a
        # store `set` sent raw is closed unread, a TCPStore client without the secret fails, a wrong secret too (the
        # base took all of it: anyone reaching the address filled rank 0's store)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            key, value = b"stranger", b"x" * 4096
            raw.sendall(b"\x01" + len(key).to_bytes(8, "little") + key + len(value).to_bytes(8, "little") + value)
            assert _closed(raw)
        with pytest.raises(RuntimeError):
            dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=3))
        with pytest.raises(Exception, match="nothing answers"):
            _connect_store(["127.0.0.1"], port, 2, 1.0, threading.Event(), key=_front_key("not the group's"))
        secret = _front_key(group_secret(tokens[0]))
        store = _connect_store(["127.0.0.1"], port, 2, 30.0, threading.Event(), key=secret)
        assert not store.check(["stranger"]), "a connection without the group's secret wrote into rank 0's store"
        assert dist.PrefixStore(f"gpupool/{lease}/", store).check(["owner"])  # (rank 0's mark: the group's own store)
        # (front54) a holder of the secret (the tenant) is bounded too: a value past MAX_STORE_VALUE, more than
        # MAX_STORE_BYTES in all, more than MAX_FRONT_KEYS keys each close its connection before the offending set
        # reaches the store (the base kept them all: under --isolation thread the daemon's memory, without bound)
        before = _peak_rss()
        with _keyed(port, secret) as raw:
            assert _send_closed(raw, _set(b"/huge", b"x" * (MAX_STORE_VALUE + 1))), "a set of 1 MiB + 1 was kept"
        big = b"y" * MAX_STORE_VALUE
        with _keyed(port, secret) as raw:  # 128 MiB in sets of 1 MiB, as long as the front takes them
            for i in range(128):
                try:
                    raw.sendall(_set(b"/fill/%d" % i, big))
                except OSError:  # (closed while we wrote)
                    break
            assert _closed(raw), "sets of 128 MiB in all were kept"
        with _keyed(port, secret) as raw:  # tiny sets under ever new keys
            assert _send_closed(raw, b"".join(_set(b"/k%d" % i, b"") for i in range(MAX_FRONT_KEYS + 1)))
        if isolation == "thread":
            grown = _peak_rss() - before
            assert grown < MAX_STORE_BYTES + 48 * MiB, f"the daemon grew by {grown / MiB:.0f} MiB (128 MiB sent)"
        assert not store.check(["huge"]), "a value past MAX_STORE_VALUE reached the store"
        assert not store.check([f"fill/{MAX_STORE_BYTES // MAX_STORE_VALUE}"]), "a set past the budget was kept"
        assert not store.check([f"k{MAX_FRONT_KEYS}"]), "a key past MAX_FRONT_KEYS was kept"
        # (audit55) a wait's cancel sent again and again is a query of its own, two at most unanswered: closed at the
        # third (the base took each into the wait's entry and forwarded it: the store queued an answer for each)
        with _keyed(port, secret) as raw:
            raw.sendall(b"\x06" + (1).to_bytes(8, "little") + (7).to_bytes(8, "little") + b"/absent")  # a wait
            try:
                for _ in range(256):  # up to 16 MiB of cancels, as long as the front takes them
                    raw.sendall(b"\x0c" * (1 << 16))
            except OSError:  # (closed while we wrote)
                pass
            assert _closed(raw), "a wait canceled 16 million times was served"
        # (sec55b) what the group's connections hold in flight is bounded for all of them together: a compare_set
        # of a 1 MiB key and a 1 MiB expected value, left before its new value (the front holds both), on each of 7
        # connections: 4 fit MAX_FRONT_FLYING (8 MiB), the others are closed (the base held each, ~3 MiB a
        # connection, and took the group's size + 8 connections: 6 GiB for a group of 1,024)
        stalled = [_keyed(port, secret) for _ in range(7)]
        try:
            n = MAX_STORE_VALUE
            query = b"\x02" + n.to_bytes(8, "little") + b"/" + b"c" * (n - 1) + n.to_bytes(8, "little") + b"e" * n
            closed = {sock for sock in stalled if _sent_or_closed(sock, query)}
            deadline = time.monotonic() + 60
            while len(closed) < len(stalled) - MAX_FRONT_FLYING // (2 * n) and time.monotonic() < deadline:
                readable, _, _ = select.select([x for x in stalled if x not in closed], [], [], 1.0)
                closed |= {sock for sock in readable if _closed(sock)}  # (the front answers none of them)
            assert len(closed) == len(stalled) - MAX_FRONT_FLYING // (2 * n), "a group held more than 8 MiB in flight"
        finally:
            for sock in stalled:
                sock.close()
        # (front54) one source holding every handshake slot (a stranger's connections that never speak) keeps no
        # other source's proof out (the base closed the 17th connection unread: every rank's join waited 10 s)
        strangers = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(MAX_FRONT_PENDING + 4)]
        try:
            with _keyed(port, secret, source="127.0.0.3") as rank:
                rank.sendall(b"\x05" + (1).to_bytes(8, "little") + (7).to_bytes(8, "little") + b"/fill/0")  # check
                assert rank.recv(1) == b"\x00"  # ready: the store answers it
        finally:
            for sock in strangers:
                sock.close()
        assert store.check(["fill/0"])  # the group's own connection lives on (what it set before the bounds stays)
        assert s.download(s.upload(torch.ones(2))).tolist() == [1.0, 1.0]  # the session is unharmed
    finally:
        s.close()
