"""gpupool/duplex.py on descriptors a busy daemon has: numbers past `select`'s 1024 (one session's bulk socket
among many) move bytes both ways, and a socket that moves nothing times out."""

from __future__ import annotations

import os
import resource
import socket
import threading

import pytest

from gpupool import duplex


@pytest.fixture
def high_pair():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip(f"the descriptor limit ({hard}) is below the numbers this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    a, b = socket.socketpair()
    high = [socket.socket(fileno=os.dup2(s.detach(), n)) for s, n in ((a, 2040), (b, 2050))]
    for s in high:
        s.setblocking(False)
    try:
        yield high
    finally:
        for s in high:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_send_and_receive_on_descriptors_past_1024(high_pair) -> None:
    a, b = high_pair
    assert a.fileno() > 1024 and b.fileno() > 1024
    data = os.urandom(8 << 20)  # more than the socket buffers hold: the sender waits for the reader
    got = bytearray(len(data))
    lock_a, lock_b = threading.Lock(), threading.Lock()
    reader = threading.Thread(target=lambda: duplex.recv_into(b, lock_b, memoryview(got), 10.0))
    reader.start()
    duplex.send_all(a, lock_a, [data[:1000], memoryview(data)[1000:]], 10.0)
    reader.join(10)
    assert got == data


def test_a_socket_that_moves_nothing_times_out(high_pair) -> None:
    a, _ = high_pair
    with pytest.raises(TimeoutError, match="no bytes moved"):
        duplex.recv_into(a, threading.Lock(), memoryview(bytearray(10)), 0.2)
