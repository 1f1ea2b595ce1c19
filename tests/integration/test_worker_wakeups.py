"""A session worker wakes once a slice: it waits for its next request in a poll (server/worker.py `wait_readable`),
not in a blocking read of its socket, which the daemon's read of its previous result word woke for nothing (Linux
wakes a unix stream socket's sleeping reader when its peer reads what it sent: "room to write"). A real daemon in
process isolation (the default), its worker's main thread's wake-ups counted from /proc."""

from __future__ import annotations

from typing import Any

import torch
from gpupool.client.session import Session

CALLS = 300


def _wakeups(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("voluntary_ctxt_switches:")).split()[1])


def test_a_synced_call_wakes_the_sessions_worker_once(daemon_factory: Any) -> None:
    """`.item()`s of an uploaded scalar (a Sync with a scalar: a slice in the worker each): the worker's main thread
    sleeps and wakes about once a call (round 39's tree: 1.7-1.9, bench/item_legs.py --wakeups), and the values are
    right."""
    d = daemon_factory()
    with Session.attach(d.address, d.token()) as s:
        h = s.upload(torch.tensor(0.5))
        for _ in range(50):  # warm: the first slices fault pages in
            s.sync([h])
        pid = d.running.daemon.session_list()[0].runner.pid
        assert pid
        before = _wakeups(pid)
        for _ in range(CALLS):
            assert s.sync([h]) == [0.5]
        per_call = (_wakeups(pid) - before) / CALLS
    assert per_call < 1.35, f"the worker woke {per_call:.2f} times a call"
