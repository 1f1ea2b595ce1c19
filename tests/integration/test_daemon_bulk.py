"""The bulk side channel (server/bulkside.py, client/bulk.py) against real daemons on loopback, TLS and plaintext:
byte-exact round trips, credentials, garbage frames, fallback, a detach in the middle of a transfer."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import threading
import time
from typing import Any

import pytest
import torch
from gpupool.client import bulk as client_bulk
from gpupool.client.session import Session
from gpupool.server import bulkside
from support import get_pki

from gpupool import protocol, tls
from gpupool._proto import device_pb2
from gpupool.errors import GpupoolError, InvalidArgument

MiB = 1024**2


@pytest.fixture(params=["tls", "plaintext"])
def bulk_daemon(request: Any, daemon_factory: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A daemon with its side port on, in TLS (the tests' PKI) or plaintext (`--insecure`, client insecure too)."""
    if request.param == "plaintext":
        monkeypatch.setenv("GPUPOOL_INSECURE", "1")
        return daemon_factory(fake_gpu_memory=640 * MiB, bulk_listen="127.0.0.1:0", tls=tls.TlsConfig(insecure=True))
    return daemon_factory(fake_gpu_memory=640 * MiB, bulk_listen="127.0.0.1:0")


def _bits(n_bytes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n_bytes // 4,), dtype=torch.int32, generator=g)


def test_large_round_trips_are_byte_exact(bulk_daemon: Any) -> None:
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        assert s._side is not None, "the session should have bound its side socket"
        for n in (MiB, 4 * MiB + 12, 64 * MiB + 4):
            big = _bits(n, seed=n).view(torch.float32)  # NaN bit patterns included
            h = s.upload(big)
            back = s.download(h)
            assert torch.equal(back.view(torch.int32), big.view(torch.int32))
        small = torch.arange(10.0)  # below the thresholds: stream only, in the same session
        assert torch.equal(s.download(s.upload(small)), small)
        x = torch.randn(2 * MiB)
        [doubled] = s.call("aten::mul.Tensor", s.upload(x), 2.0)  # ops see what the side socket carried
        assert torch.equal(s.download(doubled), x * 2)
