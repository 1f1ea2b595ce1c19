"""--worker-spin-us: the daemon's front reads a session worker's result without blocking for that long before it
sleeps on it (server/worker.py `spin_word`). Real daemons in process isolation (the default)."""

from __future__ import annotations

import os
from typing import Any

import torch
from gpupool.client.session import Session
from gpupool.server import worker


def _runner_spin(d: Any, s: Session) -> float:
    front = d.running.daemon.session_list()[0]
    assert front.runner.pid  # a worker process: the spin is ProcessRunner's
    return float(front.runner.spin)


def test_the_operators_spin_reaches_each_worker_and_results_come_through_it(daemon_factory: Any) -> None:
    """A spin long enough that every result comes within it (5 ms): uploads, ops, downloads and syncs, results
    whole; with 0, no spin."""
    for us in (5000.0, 0.0):
        d = daemon_factory(worker_spin_us=us)
        with Session.attach(d.address, d.token()) as s:
            h = s.upload(torch.arange(12.0))
            s.sync()
            assert _runner_spin(d, s) == us * 1e-6
            assert s.download(h).tolist() == torch.arange(12.0).tolist()
            for _ in range(20):
                s.sync()
            big = torch.arange(300_000.0)
            assert torch.equal(s.download(s.upload(big)), big)


def test_the_default_is_no_spin_and_minus_one_leaves_it_to_the_host(daemon_factory: Any) -> None:
    """0 (the default): no spin. -1: `spin_default` of this host when the worker starts (none on a 2-core box)."""
    d = daemon_factory()
    with Session.attach(d.address, d.token()) as s:
        s.sync()
        assert _runner_spin(d, s) == 0.0
    d = daemon_factory(worker_spin_us=-1)
    with Session.attach(d.address, d.token()) as s:
        s.sync()
        cpus, load = os.cpu_count() or 1, os.getloadavg()[0]
        got = _runner_spin(d, s)
        assert got in (0.0, worker.SPIN_AUTO)
        if cpus < 4 or load >= cpus:  # no race with the load's drift: clearly busy or small
            assert got == 0.0
