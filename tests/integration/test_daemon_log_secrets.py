"""The daemon's log never holds a session id: the id is the bearer credential of a session's stream and Detach
(`tokens.public_session_id` is what Status and heartbeats show), and logs travel to more readers than the
daemon's memory does (aggregators, support tickets). Round 30's executor logged it when it learned a run of eager
records (debug) and on an internal error; it names the session by its number now, as the rest of the daemon does."""

from __future__ import annotations

import logging

import pytest
import torch
from support import DaemonFactory
from torch import nn


def test_the_daemon_log_holds_no_session_id(daemon_factory: DaemonFactory, caplog: pytest.LogCaptureFixture) -> None:
    import gpupool.torch as gt

    caplog.set_level(logging.DEBUG, logger="gpupool.server")
    handle = daemon_factory(isolation="thread")  # the executor runs in this process: its log lines are captured
    device = gt.attach(handle.address, handle.token(tenant="logs"))
    try:
        ids = list(handle.running.daemon._sessions)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
        float(model(x.to(device)).sum().item())
    finally:
        gt.detach_all()
    assert ids and "learned a run" in caplog.text  # the line that named the session is there
    assert not [i for i in ids if i in caplog.text]
