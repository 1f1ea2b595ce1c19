"""A collective group's thread (server/collectives.py `Group.submit`): one thread runs all of a group's
collectives, in order, with the device thread's torch settings, and it ends when the group closes."""

from __future__ import annotations

import threading

import torch
from gpupool.server.collectives import Group


def test_a_groups_collectives_share_one_thread_that_ends_with_the_group() -> None:
    group = Group("lease", 0, 2, 1.0)
    ran: list[tuple[int, int, bool]] = []
    done = threading.Semaphore(0)

    def job() -> None:
        ran.append((threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled()))
        done.release()

    for _ in range(3):
        group.submit(job, "gpupool-collective-test", 1)
        assert done.acquire(timeout=30)
    assert len({ident for ident, _, _ in ran}) == 1 and ran[0][0] != threading.get_ident()
    assert all(n == 1 and not grad for _, n, grad in ran)
    (thread,) = [t for t in threading.enumerate() if t.ident == ran[0][0]]
    group.close()
    thread.join(30)
    assert not thread.is_alive()
