"""A daemon with the fake-GPU speed model: an op on a fake GPU completes no earlier than its modelled time."""

from __future__ import annotations

import time

import torch
from gpupool.client.session import Session
from gpupool.server.speedmodel import SpeedModel


def timed_add(address: str, token: str) -> float:
    s = Session.attach(address, token)
    try:
        h = s.upload(torch.ones(100))
        s.sync()
        start = time.perf_counter()
        (out,) = s.call("aten::add.Tensor", h, h)
        assert s.download(out).tolist() == [2.0] * 100  # the true result is still computed
        return time.perf_counter() - start
    finally:
        s.close()


def test_ops_take_their_modelled_time(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    slow = daemon_factory(fake_speed=SpeedModel(gbps=1e-6))  # 1000 bytes/s: add of 3 x 400 bytes takes 1.2 s
    assert timed_add(slow.address, slow.token()) >= 1.2
    plain = daemon_factory()
    # the quickest of three: one add on a busy machine may take a second, three in a row all that long are the model
    assert min(timed_add(plain.address, plain.token()) for _ in range(3)) < 1.2
