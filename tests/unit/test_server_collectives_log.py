"""The log of failed store joins (server/collectives.py `_STORE_LOG`): a tenant can fail joins in a loop, and each
failure's detail (the address's state, now kept from the client) must not become a line of the daemon's log."""

from __future__ import annotations

import logging
import types

import pytest
from gpupool.server import collectives
from gpupool.server.collectives import _RateLimitedLog


def test_failed_joins_log_at_most_the_limit_a_window_then_how_many_were_dropped(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The log's clock is the test's (round 28 slept 0.6 s past a 0.5 s window that began when the log was made: a
    # loaded box stalling the 50 calls past it split them over two windows)
    now = [1000.0]
    monkeypatch.setattr(collectives, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    logger = logging.getLogger("gpupool.test.ratelimit")
    limited = _RateLimitedLog(logger, limit=3, window=0.5)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for i in range(50):
            limited.warning("join %d failed", i)
            now[0] += 0.009  # 0.441 s in all: still the first window
        assert [r.getMessage() for r in caplog.records] == ["join 0 failed", "join 1 failed", "join 2 failed"]
        now[0] += 0.06  # the window is over
        limited.warning("join %d failed", 50)
    assert [r.getMessage() for r in caplog.records[3:]] == [
        "47 more such warnings in 0.5 s were not logged",
        "join 50 failed",
    ]
