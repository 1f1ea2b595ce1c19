"""Round 52 review (secrev52): data parallelism's collectives and the scheduler's inputs, attacked as a stranger on the
hosts' network or a tenant would, on real daemons (docs/security.md "Round 52 review (secrev52)").

Rank 0's group store (torch's TCPStore) listened on every interface of its host whatever address the daemon was
given: a daemon of `gpupool up` (127.0.0.1) had its groups' stores open to every network of the machine, where anyone
wrote values into them (up to 8 MiB each, any number of keys: rank 0's worker's memory, the daemon's under --isolation
thread) or deleted them. It now listens on the daemon's peer-facing host only, as the secure hub does. (hole53) And
there it forwards to the store only a connection that proves the group's secret.
"""

from __future__ import annotations

import socket
import threading
import uuid
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from gpupool.client.session import Session
from gpupool.server.collectives import _connect_store, _front_key, group_secret
from support import MiB

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
        store = _connect_store(["127.0.0.1"], port, 2, 30.0, threading.Event(), key=_front_key(group_secret(tokens[0])))
        assert not store.check(["stranger"]), "a connection without the group's secret wrote into rank 0's store"
        assert dist.PrefixStore(f"gpupool/{lease}/", store).check(["owner"])  # (rank 0's mark: the group's own store)
        assert s.download(s.upload(torch.ones(2))).tolist() == [1.0, 1.0]  # the session is unharmed
    finally:
        s.close()
