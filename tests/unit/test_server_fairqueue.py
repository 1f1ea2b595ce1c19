"""The weighted fair queue: service in proportion to shares, no banked credit after idling, back-pressure."""

from __future__ import annotations

import threading
import time

import pytest
from gpupool.server import fairqueue
from gpupool.server.fairqueue import PARKED_BYTES, FairQueue, HostQueued


def serve(q: FairQueue, cost: dict[str, float], rounds: int) -> dict[str, float]:
    """Run `rounds` slices, charging each session its fixed cost per slice; returns charged time per owner."""
    got: dict[str, float] = {k: 0.0 for k in cost}
    for _ in range(rounds):
        taken = q.take(1)
        assert taken is not None
        entry, _cmds = taken
        got[entry.owner] += cost[entry.owner]
        q.charge(entry, cost[entry.owner])
    return got


def test_backlogged_sessions_share_in_proportion_to_their_weights() -> None:
    q = FairQueue()
    low, high = q.add("low", 0.25), q.add("high", 0.75)
    q.put(low, ["op"] * 5000, 0)
    q.put(high, ["op"] * 5000, 0)
    got = serve(q, {"low": 0.001, "high": 0.003}, 2000)  # unequal op costs: charging is by time, not ops
    total = got["low"] + got["high"]
    assert abs(got["low"] / total - 0.25) < 0.01


def test_idle_session_cannot_bank_credit_and_idle_share_is_lent() -> None:
    q = FairQueue()
    a, b = q.add("a", 0.5), q.add("b", 0.5)
    q.put(a, ["op"] * 1000, 0)
    got = serve(q, {"a": 0.001, "b": 0.001}, 500)  # b idle: a gets everything (work-conserving)
    assert got["b"] == 0.0 and got["a"] == pytest.approx(0.5)
    q.put(b, ["op"] * 1000, 0)  # b returns: it starts at the current virtual time, not 0.5 s behind
    got = serve(q, {"a": 0.001, "b": 0.001}, 400)
    assert abs(got["a"] - got["b"]) <= 0.002


def test_take_pops_at_most_the_slice_and_give_back_restores_order() -> None:
    q = FairQueue()
    e = q.add("s", 1.0)
    q.put(e, [1, 2, 3], 0)
    q.put(e, [4, 5], 0)
    taken = q.take(4)
    assert taken is not None and taken[1] == [1, 2, 3, 4]
    q.give_back(e, [3, 4])
    q.charge(e, 0.0)
    assert q.take(10) == (e, [3, 4, 5])


def test_full_queue_blocks_the_producer_until_drained_or_closed() -> None:
    q = FairQueue(max_commands=4, max_bytes=1 << 20)
    e = q.add("s", 1.0)
    assert q.put(e, [1, 2, 3], 10)
    done = threading.Event()
    results: list[bool] = []

    def produce() -> None:
        results.append(q.put(e, [4, 5], 10))
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    assert not done.wait(0.2)  # blocked: 3 + 2 > 4
    q.take(3)
    assert done.wait(5) and results == [True]
    q.charge(e, 0.0)
    assert q.take(10) == (e, [4, 5])
    q.put(e, [6, 7, 8, 9], 0)
    blocked = threading.Thread(target=lambda: results.append(q.put(e, [10], 0)), daemon=True)
    blocked.start()
    time.sleep(0.1)
    q.remove(e)
    blocked.join(5)
    assert results == [True, False]


def test_the_hosts_queued_bytes_past_each_sessions_first_4_mib_are_shared_by_every_device() -> None:
    """Round 37 (quota37): two devices' queues share one count (`HostQueued`) of bytes past `PARKED_BYTES` a session;
    a put past it waits until a queue of either device frees room (the other device's by the poll), while every
    session may still queue its first `PARKED_BYTES` and a frame into an empty queue."""
    mib = 1 << 20
    host = HostQueued(8 * mib)
    q0, q1 = FairQueue(host=host), FairQueue(host=host)
    a, b, c = q0.add("a", 1.0), q1.add("b", 1.0), q1.add("c", 1.0)
    for _ in range(3):
        assert q0.put(a, ["op"], 4 * mib)  # a: 12 MiB, 8 past its first 4
    assert host.over == 8 * mib
    assert q1.put(b, ["op"], 16 * mib)  # into an empty queue: always (12 MiB past)
    assert q1.put(c, ["op"], 3 * mib) and q1.put(c, ["op"], 1 * mib)  # its first 4 MiB: always
    assert host.over == 20 * mib
    done = threading.Event()
    threading.Thread(target=lambda: done.set() if q1.put(c, ["op"], 1 * mib) else None, daemon=True).start()
    assert not done.wait(0.2)  # past the host's 8 MiB
    q0.take(2)  # device 0 frees 8 MiB of a's: not enough yet (12 MiB of b's)
    assert host.over == 12 * mib and not done.wait(0.2)
    assert q1.take(1) is not None  # b's 16 MiB frame (c's turn comes after it: fair queue order)
    assert done.wait(5) and host.over == 1 * mib
    q0.remove(a)
    q1.remove(c)
    q1.remove(b)
    assert host.over == 0 and c.nbytes == 0 and PARKED_BYTES == 4 * mib


def test_wait_idle_and_stop() -> None:
    q = FairQueue()
    e = q.add("s", 1.0)
    q.put(e, [1], 0)
    assert not q.wait_idle(0.05)
    taken = q.take(1)
    assert taken is not None
    q.charge(e, 0.0)
    assert q.wait_idle(1)
    q.stop()
    assert q.take(1) is None


def _take_in_thread(q: FairQueue) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(q.take(10)), daemon=True)
    t.start()
    return t, got


@pytest.mark.parametrize("at_once", [False, True])
def test_an_idle_device_hands_the_first_slice_to_the_caller_and_runs_nothing_else_meanwhile(at_once: bool) -> None:
    """put_and_claim (a stream reader running a slice itself): on an idle device it pops what take() would
    have handed out next; until that slice is charged the device's thread gets nothing, not even a session
    that became ready meanwhile; after it, the rest of the frame and the other session go to the device's
    thread in virtual-time order, and the caller was charged like any slice. `at_once`: the slice's end told
    by `done` (its unexecuted rest and its time under one lock), as the daemon tells it."""
    q = FairQueue()
    a, b = q.add("a", 0.5), q.add("b", 0.5)
    assert q.put_and_claim(a, [1, 2, 3], 30, 2) == [1, 2]
    assert a.running and a.commands == 1
    t, got = _take_in_thread(q)
    q.put(b, ["b1"], 0)  # ready now, but the device is claimed
    t.join(0.2)
    assert t.is_alive() and not got
    if at_once:
        q.done(a, [2], 0.010, claimed=True)  # the slice ran only command 1
    else:
        q.give_back(a, [2])
        q.charge(a, 0.010, claimed=True)
    t.join(5)
    assert got == [(b, ["b1"])]  # b never ran: it has the least virtual time
    q.charge(b, 0.001)
    assert q.take(10) == (a, [2, 3])
    assert a.vtime == pytest.approx(0.020)


def test_a_claimed_frame_that_fits_the_slice_leaves_the_queue_as_popping_it_would() -> None:
    """The usual claim (an `.item()`: the whole frame is the slice) is handed back without queueing it: the
    session runs with nothing queued, the device stays claimed, and virtual time moves as a popped slice's
    does: the session comes back from idle without banked credit and the queue's clock reaches its time."""
    q = FairQueue()
    a, b = q.add("a", 0.5), q.add("b", 0.5)
    assert q.put_and_claim(a, ["a1"], 10, 8) == ["a1"]
    q.charge(a, 0.05, claimed=True)  # a.vtime 0.1, the clock still 0
    q.put(b, ["b1"], 0)
    assert q.take(8) == (b, ["b1"])
    q.charge(b, 0.01)  # b.vtime 0.02
    frame = ["a2", "a3"]
    assert q.put_and_claim(a, frame, 20, 2) is frame
    assert a.running and a.commands == 0 and a.nbytes == 0 and not q.idle(a)
    t, got = _take_in_thread(q)
    q.put(b, ["b2"], 0)  # ready, but the device is claimed
    t.join(0.2)
    assert t.is_alive() and not got
    q.charge(a, 0.0, claimed=True)
    t.join(5)
    assert got == [(b, ["b2"])]
    q.charge(b, 0.0)
    c = q.add("c", 0.5)
    q.put(c, ["c1"], 0)  # new: starts at the clock, which the claim moved to a's 0.1
    assert c.vtime == pytest.approx(0.1)
    assert q.idle(a) and a.vtime == pytest.approx(0.1)


def test_no_claim_while_another_session_runs_or_waits() -> None:
    """Fair sharing is the device thread's: with another session running or backlogged, or this one's own
    commands still queued, put_and_claim only queues (None), as put does; a closed session gets []."""
    q = FairQueue()
    a, b = q.add("a", 0.5), q.add("b", 0.5)
    q.put(b, ["b1", "b2"], 0)
    assert q.put_and_claim(a, ["a1"], 0, 8) is None  # b waits to run
    assert a.commands == 1 and not a.running
    q.put(b, ["b3"], 0)
    c = q.add("c", 0.5)
    taken = q.take(1)
    assert taken is not None and taken[0] in (a, b)
    assert q.put_and_claim(c, ["c1"], 0, 8) is None  # a session runs (and another waits)
    q.charge(taken[0], 0.001)
    assert q.put_and_claim(a, ["a2"], 0, 8) is None  # a's own commands are still queued
    assert not a.running and not c.running
    q.remove(a)
    assert q.put_and_claim(a, ["a4"], 0, 8) == []
    q2 = FairQueue()
    x, y = q2.add("x", 0.5), q2.add("y", 0.5)
    q2.put(x, ["x1"], 0)
    assert q2.take(8) == (x, ["x1"])  # x runs, nothing waits
    assert q2.put_and_claim(y, ["y1"], 0, 8) is None
    q2.charge(x, 0.001)
    assert q2.take(8) == (y, ["y1"])


def test_a_claimed_slice_keeps_the_device_busy_for_a_drain() -> None:
    q = FairQueue()
    a = q.add("a", 1.0)
    assert q.put_and_claim(a, ["a1"], 0, 8) == ["a1"]
    assert not q.wait_idle(0.05)
    threading.Timer(0.1, lambda: q.charge(a, 0.001, claimed=True)).start()
    assert q.wait_idle(5)


def test_a_running_slice_is_told_whether_another_session_waits_to_run() -> None:
    """`contend` (a collective waiting for its peers keeps the device while it says nobody waits): told at each
    slice handed out, and once more when another session's work arrives or is unblocked while it runs."""
    q = FairQueue()
    told: list[tuple[str, bool]] = []
    q.contend = lambda entry, contended: told.append((entry.owner, contended))
    a, b = q.add("a", 0.5), q.add("b", 0.5)
    q.put(a, ["op"] * 4, 0)
    entry, _ = q.take(1) or (None, None)
    assert entry is a and told == [("a", False)]  # alone
    q.put(a, ["op"], 0)  # its own work is no other session's
    assert told == [("a", False)]
    q.put(b, ["op"], 0)
    assert told == [("a", False), ("a", True)]
    q.put(b, ["op"], 0)  # said once
    assert told == [("a", False), ("a", True)]
    q.done(a, [], 0.001)
    taken = q.take(1)
    assert taken is not None and taken[0] is b and told[-1] == ("b", True)  # a waits too
    q.done(b, [], 0.001)
    q.block(b, lambda: True)
    assert q.take(8) is not None and told[-1] == ("a", False)  # b is parked: nobody else may run
    q.unblock(b, lambda: False)
    assert told[-1] == ("a", True)  # b may run again
    q.done(a, [], 0.001)
    c = q.add("c", 0.5)
    q.remove(b)
    assert q.put_and_claim(c, ["op"], 0, 8) == ["op"] and told[-1] == ("c", False)  # an idle device, claimed


def test_a_reader_waiting_for_the_hosts_room_is_woken_by_the_device_that_frees_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A put waiting for room in the host's queued bytes (`HostQueued`) on device 1 is woken by device 0's queue as it
    frees the room (`HostQueued.wake`), not found by a poll (round 37 looked again every 20 ms, HOST_POLL_SECONDS: made
    an hour here, the base's reader slept on). The bound below is a hang's, not a timing."""
    monkeypatch.setattr(fairqueue, "HOST_POLL_SECONDS", 3600.0, raising=False)
    mib = 1 << 20
    host = HostQueued(4 * mib)
    q0, q1 = FairQueue(host=host), FairQueue(host=host)
    a, b = q0.add("a", 1.0), q1.add("b", 1.0)
    assert q0.put(a, ["op"], 4 * mib) and q0.put(a, ["op"], 4 * mib)  # 4 MiB past a's first 4: the host's limit
    assert q1.put(b, ["op"], 4 * mib)  # b's first 4 MiB
    assert host.over == 4 * mib
    done = threading.Event()
    threading.Thread(target=lambda: done.set() if q1.put(b, ["op"], 1 * mib) else None, daemon=True).start()
    assert not done.wait(0.2)  # 1 MiB past the host's 4
    assert q0.take(1) is not None  # device 0 runs a's first frame: 4 MiB freed
    assert done.wait(60) and host.over == 1 * mib
    q0.remove(a)
    q1.remove(b)
    assert host.over == 0
