"""The weighted fair queue: service in proportion to shares, no banked credit after idling, back-pressure."""

from __future__ import annotations

import threading
import time

import pytest
from gpupool.server.fairqueue import FairQueue


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
