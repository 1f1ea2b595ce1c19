"""`gpupool up` supervises: kill -9 of its daemon restarts the daemon and keeps the scheduler (and its leases),
kill -9 of its scheduler restarts it from its state, and kill -9 of `up` itself takes both children with it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from gpupool.client.pool import SchedulerClient, lease
from scheduler_fixtures import Proc, alive, children_of, wait_until

from gpupool.errors import Unavailable

pytestmark = pytest.mark.slow


def child(up: Proc, program: str) -> int:
    """The pid of `up`'s child running `gpupool <program>`."""
    for pid in children_of(up.popen.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if program.encode() in argv and alive(pid):
            return pid
    raise AssertionError(f"no {program} child of gpupool up:\n{up.log()}")


def hosts_up(address: str) -> bool:
    try:
        return [h.state for h in SchedulerClient(address).list_pool().hosts] == ["up"]
    except Unavailable:
        return False


def test_up_restarts_a_dead_child_and_its_children_die_with_it(tmp_path: Path) -> None:
    up = Proc(
        ["up", "--fake-gpus", "1", "--fake-gpu-memory", "256MiB", "--scheduler-listen", "127.0.0.1:0",
         "--listen", "127.0.0.1:0", "--state", str(tmp_path / "state" / "scheduler.db"),
         "--metrics-listen", "0", "--scheduler-metrics-listen", "0"]
    )  # fmt: skip
    try:
        address = up.wait_for(r"export GPUPOOL_SCHEDULER=(\S+)", timeout=120).group(1)
        held = lease(1, 0.25, scheduler=address, tenant="other")
        scheduler, daemon = child(up, "scheduler"), child(up, "serve")

        os.kill(daemon, signal.SIGKILL)
        up.wait_for("the daemon exited .*started it again")
        wait_until(lambda: child(up, "serve") != daemon, what="a new daemon")
        wait_until(lambda: hosts_up(address), timeout=60, what="the new daemon registered")
        assert child(up, "scheduler") == scheduler and up.popen.poll() is None
        assert held.lease_id in {x.lease_id for x in SchedulerClient(address).list_pool().leases}

        os.kill(scheduler, signal.SIGKILL)
        up.wait_for("the scheduler exited .*started it again")
        wait_until(lambda: hosts_up(address), timeout=60, what="the scheduler back")
        assert held.lease_id in {x.lease_id for x in SchedulerClient(address).list_pool().leases}
        held.renew()

        kids = [child(up, "scheduler"), child(up, "serve")]
        held._stop.set()
        up.kill()  # kill -9: no chance to stop its children itself
        wait_until(lambda: not any(alive(pid) for pid in kids), timeout=30, what="the children to exit")
    finally:
        up.stop()
