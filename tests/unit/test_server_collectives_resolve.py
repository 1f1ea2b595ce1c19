"""A group store's host name is resolved once, by the joining daemon (server/collectives.py `_resolve_store`): the
addresses it checked (loopback or private only) are the ones it connects to, never the name again, which a hostile
DNS server could answer differently the second time (DNS rebinding). Against the real resolver and a real TCPStore
on loopback."""

from __future__ import annotations

import ipaddress
import socket
import threading
from datetime import timedelta

import pytest
import torch.distributed as dist
from gpupool.server.collectives import _connect_store, _peer_address, _resolve_store

from gpupool.errors import InvalidArgument, PermissionDenied


def test_a_name_becomes_the_checked_ips_and_the_store_is_reached_at_one_of_them() -> None:
    master = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    answers = {info[4][0] for info in socket.getaddrinfo("localhost", master.port, type=socket.SOCK_STREAM)}
    assert _peer_address(f"localhost:{master.port}") == ("localhost", master.port)  # a name: resolved later, once
    addresses = _resolve_store("localhost", master.port)
    assert addresses and set(addresses) <= answers
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses)  # IPs, never the name
    store = _connect_store(addresses, master.port, 2, 10.0, threading.Event())
    assert store.host in addresses  # the TCPStore was made with a checked IP: torch resolves nothing again
    store.set("k", "v")
    assert master.get("k") == b"v"


def test_addresses_are_checked_literal_ones_at_once_and_names_once_resolved() -> None:
    with pytest.raises(PermissionDenied, match="not on a private network"):
        _peer_address("8.8.8.8:4000")  # an IP: nothing of the daemon's network in the answer
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        _peer_address("localhost")
    with pytest.raises(PermissionDenied, match="not on a private network"):
        _resolve_store("8.8.8.8", 4000)  # a literal resolves to itself: the same check in the join's thread
    with pytest.raises(Exception, match="cannot resolve"):  # detail for the operator's log (the client: uniform)
        _resolve_store("no-such-host.invalid", 4000)
