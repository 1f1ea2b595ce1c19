"""Round 47 red team (hostile47): overhead46 set a session's conv layout once per worker process
(server/worker.py `_SessionState.own_thread`/`run_owned`, gpupool/metas.py `own_conv_layout`), where it was a context
manager a slice. Under `--isolation thread` sessions share the daemon's process and a device's thread: one tenant's
choice ("conv_layout" asked at Attach or not) must never become another's, whichever ran the slice before."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from gpupool.client.session import Session
from support import in_threads
from test_conv_layout import CL, _conv_read_as, _inputs

from gpupool import protocol


def test_sessions_sharing_a_device_thread_keep_their_own_conv_layouts(daemon_factory: Any) -> None:
    """Two sessions of one fake GPU under --isolation thread (one device thread runs both), one that asked for
    "conv_layout" and one that did not, convolving at once from two threads, 4 rounds each: each reads the CPU's
    values through the geometry its own choice gives (channels_last for the first, contiguous for the second), never
    the neighbour's (a view with the other layout's strides reads the outputs out of order). Then a session of each
    kind alone after the other: the same. Pins behaviour that holds on 41939607; a layout set once per thread (as
    `run_owned` does) fails it."""
    daemon = daemon_factory(fake_gpu_memory=64 * 1024 * 1024, isolation="thread")
    x, w = _inputs()
    want = F.conv2d(x.to(memory_format=CL), w)
    ask = [protocol.FEATURE_CONV_LAYOUT]

    def convolve(s: Session, fmt: torch.memory_format) -> None:
        for _ in range(4):
            got = _conv_read_as(s, fmt)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"{fmt}: another layout's values"

    with (
        Session.attach(daemon.address, daemon.token(tenant="cl"), features=ask) as a,
        Session.attach(daemon.address, daemon.token(tenant="plain")) as b,
    ):
        in_threads(lambda: convolve(a, CL), lambda: convolve(b, torch.contiguous_format), timeout=120)
    for features, fmt in (([], torch.contiguous_format), (ask, CL), ([], torch.contiguous_format)):
        with Session.attach(daemon.address, daemon.token(tenant=f"alone-{len(features)}"), features=features) as s:
            assert torch.allclose(_conv_read_as(s, fmt), want, rtol=1e-5, atol=1e-6), fmt
