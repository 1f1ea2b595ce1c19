"""The worker's end of the slice socket (server/worker.py): requests read in one piece however they arrive,
never more than one request at a time, and result words read whole. Real socket pairs, no worker process."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from gpupool.server import slices, worker


def _dribble(sock: socket.socket, data: bytes, sizes: list[int]) -> threading.Thread:
    """Send `data` in pieces of `sizes` (the rest at the end) from another thread, as a slow kernel would."""

    def run() -> None:
        pos = 0
        for n in sizes:
            sock.sendall(data[pos : pos + n])
            pos += n
        sock.sendall(data[pos:])

    t = threading.Thread(target=run)
    t.start()
    return t


def test_requests_are_read_one_at_a_time_however_they_arrive() -> None:
    a, b = socket.socketpair()
    head = bytearray(4 + slices.REQUEST_HEAD)
    shared = memoryview(bytearray(64))
    run = slices.shared_request(slices.SliceRequest(10, 20, 0.5, b"", slot=1), 7)
    inline = b"".join(bytes(p) for p in slices.encode_request(slices.SliceRequest(1, 2, 0.1, b"payload" * 20)))
    try:
        # a ping and a slice request back to back in the socket (a late ping): the ping alone, then the slice
        a.sendall(slices.PING_REQUEST + run)
        assert slices.is_ping(worker._recv_request(b, head))
        req = slices.decode_request(worker._recv_request(b, head), shared)
        assert req is not None and (req.device_free, req.reply_room, req.budget, req.slot) == (10, 20, 0.5, 1)
        assert len(req.payload) == 7
        # a request with its payload in the socket, longer than the head buffer, dribbled in odd pieces
        for sizes in ([1], [3, 1, 2], [4], [5, 40, 1], [46, 1]):
            t = _dribble(a, inline + run, sizes)
            got = slices.decode_request(worker._recv_request(b, head), shared)
            assert got is not None and bytes(got.payload) == b"payload" * 20
            assert slices.decode_request(worker._recv_request(b, head), shared) is not None
            t.join()
        a.sendall(slices.EXIT_REQUEST)
        assert slices.decode_request(worker._recv_request(b, head), shared) is None  # the exit
        a.sendall(run[:10])
        a.close()
        with pytest.raises(EOFError):
            worker._recv_request(b, head)  # the daemon went away mid-request
    finally:
        a.close()
        b.close()


def test_result_words_are_read_whole() -> None:
    a, b = socket.socketpair()
    try:
        word = struct.pack("<I", 1234 | slices.SHARED)
        for sizes in ([4], [1], [2, 1], [3]):
            t = _dribble(a, word, sizes)
            assert worker._recv_word(b) == (1234 | slices.SHARED,)
            t.join()
        a.sendall(b"\x01\x02")
        a.close()
        with pytest.raises(EOFError):
            worker._recv_word(b)
    finally:
        a.close()
        b.close()


def test_a_spinning_read_takes_a_word_within_it_and_leaves_the_socket_to_block_after() -> None:
    """`spin_word` (the daemon's bounded spin on a worker's result, --worker-spin-us): None when nothing came
    within the spin (the caller then blocks as before), what came when it did, b"" when the peer closed; and
    `_recv_word` with a spin reads words whole however they arrive."""
    a, b = socket.socketpair()
    try:
        assert worker.spin_word(b, 20e-6) is None  # nothing: given up, nothing consumed
        word = struct.pack("<I", 77 | slices.SHARED)
        a.sendall(word)
        assert worker.spin_word(b, 20e-6) == word
        for sizes in ([4], [1], [2, 1], [3]):
            t = _dribble(a, word, sizes)
            assert worker._recv_word(b, 0.5) == (77 | slices.SHARED,)
            t.join()
        a.close()
        assert worker.spin_word(b, 20e-6) == b""
        with pytest.raises(EOFError):
            worker._recv_word(b, 20e-6)
    finally:
        a.close()
        b.close()


def test_the_spin_is_left_to_hosts_with_cores_to_spare() -> None:
    """--worker-spin-us's default (-1): a spin on hosts of 4+ cores under half load, none where a spinning
    thread would take the core the worker needs."""
    assert worker.spin_default(cpus=2, load=0.0) == 0.0
    assert worker.spin_default(cpus=16, load=1.0) == worker.SPIN_AUTO > 0
    assert worker.spin_default(cpus=16, load=9.0) == 0.0
    assert worker.spin_default(cpus=4, load=1.9) == worker.SPIN_AUTO
