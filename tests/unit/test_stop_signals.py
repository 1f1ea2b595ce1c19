"""The daemon's and the scheduler's stop on SIGINT/SIGTERM never waits on a lock the main thread holds (stop40).

journey40: 2 of 5 Ctrl-C's of `gpupool up` took 17-18 s and the daemon's "got SIGINT: draining" and "stopped" lines
never came: the daemon's signal handler logged, a handler runs in the main thread between two bytecodes, and the
terminal's SIGINT and then `up`'s SIGTERM came while that thread was inside the log sink's non-reentrant lock
(`LineSink.put` of the first handler's line, or `logging.shutdown`'s flush): the second handler's log call waited for
it forever, `up` killed the daemon after 15 s (py-spy: MainThread in Condition.__enter__ <- LineSink.put <- ... <-
on_signal <- Condition.notify <- LineSink.put <- ... <- on_signal <- Event.wait). Here the signals come, made
deterministic, while the main thread holds that lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import logging, os, signal
    from gpupool import logsink
    from gpupool.config import StopSignals, setup_logging
    from server import cli

    setup_logging("gpupool-serve", background=True)
    signals = StopSignals()
    with logsink.PUMP.sink._ready:  # the main thread inside the sink's lock, as in LineSink.put or its flush
        os.kill(os.getpid(), signal.%s)
        os.kill(os.getpid(), signal.SIGTERM)
        held = sum(range(1000))  # bytecodes: Python runs the pending handlers here, the lock held
    cli.wait_for_stop(signals)
    logging.getLogger("server.cli").info("stopped")
    logging.shutdown()
    logsink.PUMP.drain()
    os._exit(0)
    """
)


def _stop(first: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD % first], capture_output=True, text=True, timeout=60, check=False
    )  # (before the fix: no exit, the timeout fails the test)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_sigint_then_sigterm_while_the_log_lock_is_held_stops_with_its_lines() -> None:
    err = _stop("SIGINT")
    assert "got SIGINT: draining" in err
    assert err.index("got SIGINT: draining") < err.index("stopped")
    assert "SIGTERM" not in err  # the first signal is the one said


def test_sigterm_twice_while_the_log_lock_is_held_stops_with_its_lines() -> None:
    err = _stop("SIGTERM")
    assert "got SIGTERM: draining" in err and "stopped" in err


def test_wait_times_out_without_a_signal_and_takes_only_its_signals() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal; from gpupool.config import StopSignals\n"
            "s = StopSignals((signal.SIGTERM,)); signal.signal(signal.SIGUSR1, lambda *_: None)\n"
            "assert s.wait(0.05) is None\n"
            "os.kill(os.getpid(), signal.SIGUSR1); assert s.wait(0.05) is None\n"
            "os.kill(os.getpid(), signal.SIGTERM); assert s.wait(5) == signal.SIGTERM\n"
            "assert s.wait(0) == signal.SIGTERM; print('ok')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.stdout.strip() == "ok", out.stderr
