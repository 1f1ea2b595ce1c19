"""The worker's end of the slice socket (server/worker.py): requests read in one piece however they arrive,
never more than one request at a time, and result words read whole. Real socket pairs, no worker process."""

from __future__ import annotations

import mmap
import select
import socket
import struct
import threading
import time
from typing import Any

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


def _switches(tid: int) -> int:
    """A thread's voluntary context switches so far (each time it slept and was woken)."""
    with open(f"/proc/self/task/{tid}/status") as f:
        return int(next(line for line in f if line.startswith("voluntary_ctxt_switches:")).split()[1])


def _asleep(tid: int) -> bool:
    with open(f"/proc/self/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "S"


def _woken_while_peer_reads(read: Any, mine: socket.socket, peer: socket.socket, sent: int, answer: bytes) -> Any:
    """Run `read()` in a thread that waits on `mine`, whose earlier `sent` bytes are still in the socket for `peer`;
    once the thread is asleep, `peer` reads them (what the worker does with the daemon's request, and the daemon with
    the worker's result word) and then sends `answer`. Returns (the thread's wake-ups while the peer read, what
    `read()` returned)."""
    out: list[Any] = []
    tid: list[int] = []

    def run() -> None:
        tid.append(threading.get_native_id())
        out.append(read())

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while not tid or not _asleep(tid[0]):  # asleep in its wait (a fresh thread's start settles first)
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.05)
    before = _switches(tid[0])
    assert len(peer.recv(sent)) == sent
    time.sleep(0.05)  # a wake-up, if any, happens at once
    woken = _switches(tid[0]) - before
    peer.sendall(answer)
    t.join(10)
    return woken, out[0]


def test_a_reader_waiting_for_its_next_request_or_result_is_not_woken_when_the_peer_reads() -> None:
    """The daemon's wait for a worker's result (`_recv_word`, the runner's poller) and the worker's wait for its next
    request (`_recv_request` with the worker loop's poller) sleep in a poll for POLLIN (`wait_readable`), not in the
    read: a thread asleep in a blocking recv on a unix stream socket is woken also when the peer reads what this end
    sent before ("room to write"), wakes for nothing and sleeps again (round 39 counted ~1.7-1.9 worker wake-ups a
    synced call, bench/item_legs.py --wakeups; now 1.0). The answers are read whole as before."""
    a, b = socket.socketpair()
    try:
        poller = select.poll()
        poller.register(a, select.POLLIN)
        # the daemon's end: its request is still in the socket when it starts waiting for the result word
        a.sendall(b"r" * 38)
        word = struct.pack("<I", 42 | slices.SHARED)
        woken, got = _woken_while_peer_reads(lambda: worker._recv_word(a, 0.0, poller), a, b, 38, word)
        assert (woken, got) == (0, (42 | slices.SHARED,))
        # the worker's end: its result word is still in the socket when it starts waiting for the next request
        waiting = select.poll()
        waiting.register(b, select.POLLIN)
        head = bytearray(4 + slices.REQUEST_HEAD)
        b.sendall(word)
        run = slices.shared_request(slices.SliceRequest(10, 20, 0.5, b"", slot=1), 7)
        woken, got = _woken_while_peer_reads(lambda: bytes(worker._recv_request(b, head, waiting)), b, a, 4, run)
        assert woken == 0
        req = slices.decode_request(got, memoryview(bytearray(64)))
        assert req is not None and (req.device_free, req.reply_room, req.budget, req.slot) == (10, 20, 0.5, 1)
        # a peer that closes wakes the poll, and the read says so
        a.close()
        with pytest.raises(EOFError):
            worker._recv_request(b, head, waiting)
    finally:
        a.close()
        b.close()


_SPANS = [b"\x0a\x02\x08\x01", b"\x0a\x03\x12\x01\x07" * 3, b"\x0a\x00"]


@pytest.mark.parametrize("spans", [_SPANS[:1], _SPANS])
def test_a_small_slice_left_uncounted_reaches_the_worker_as_the_join_of_its_spans(spans: list[bytes]) -> None:
    """Round 48: the daemon leaves a small frame's spans uncounted (`SliceRequest.size` `worker.SMALL`, what
    `Daemon._slice` sets for a frame's slice of fewer than BIG_PART bytes): `ProcessRunner.run` joins them into
    the shared buffer as before and takes their count from the join, so the worker's request names exactly their
    bytes, and the result comes back as ever. Here the worker's end reads the request as `worker_main` does."""
    ours, theirs = socket.socketpair()
    shared = mmap.mmap(-1, worker.SHARED_BYTES)
    r = worker.ProcessRunner(0, ours, shared, 1 << 20)
    seen: list[Any] = []

    def play_worker() -> None:
        body = worker._recv_request(theirs, bytearray(64))
        req = slices.decode_request(body, memoryview(shared)[worker.DATA_AT : worker.SLOTS_AT])
        seen.append(None if req is None else bytes(req.payload))
        theirs.sendall(b"".join(slices.encode_result(slices.SliceResult(executed=len(spans)))))

    t = threading.Thread(target=play_worker)
    t.start()
    try:
        req = slices.SliceRequest(0, 1 << 20, 1.0, b"", False, -1, worker.SMALL)
        res = r.run(req, len(spans), spans)
    finally:
        t.join(10)
        r.close()
        theirs.close()
    assert seen == [b"".join(spans)]
    assert res.executed == len(spans)
