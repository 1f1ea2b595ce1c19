"""Uploads and downloads in 4 MiB chunks over the session stream: bit-exact, every dtype, any size."""

from __future__ import annotations

from typing import Any

import numpy
import pytest
import torch
from gpupool.client.session import Handle, Session

from gpupool import wire

MiB = 1024**2


def test_256_mib_round_trip_is_bit_exact(daemon_factory: Any) -> None:
    d = daemon_factory(fake_gpu_memory=640 * MiB)
    bits = torch.randint(-(2**31), 2**31 - 1, (256 * MiB // 4,), dtype=torch.int32)
    big = bits.view(torch.float32)  # any bit patterns, NaNs included
    with Session.attach(d.address, d.token()) as s:
        h = s.upload(big)
        back = s.download(h)
        assert back.dtype == torch.float32 and back.shape == big.shape
        assert torch.equal(back.view(torch.int32), big.view(torch.int32))


@pytest.mark.parametrize("dtype", list(wire.DTYPES))
def test_every_dtype_round_trips(daemon: Any, dtype: torch.dtype) -> None:
    source = torch.randint(0, 2, (3, 5)) if dtype == torch.bool else torch.randn(3, 5, dtype=torch.float64) * 50
    t = source.to(dtype)
    with Session.attach(daemon.address, daemon.token()) as s:
        assert torch.equal(s.download(s.upload(t)), t)


def test_shapes_views_numpy_and_chunk_edges(daemon: Any) -> None:
    with Session.attach(daemon.address, daemon.token()) as s:
        cases = [
            torch.tensor(3.5),  # 0-dim
            torch.empty(0, 4),  # empty
            torch.arange(24.0).view(4, 6).t(),  # non-contiguous source
            torch.arange(wire.CHUNK_BYTES // 4, dtype=torch.float32),  # exactly one chunk
            torch.arange(wire.CHUNK_BYTES // 4 + 1, dtype=torch.float32),  # one byte-run past a chunk
        ]
        for t in cases:
            assert torch.equal(s.download(s.upload(t)), t)
        arr = numpy.arange(10, dtype=numpy.int16)
        assert s.download(s.upload(arr)).tolist() == arr.tolist()
        h = Handle(s.upload(torch.arange(12.0).view(3, 4)))
        [col] = s.call("aten::select.int", h, 1, 2)  # a strided view downloads as its values
        assert s.download(col).tolist() == [2.0, 6.0, 10.0]


def test_upload_into_chosen_handle_replaces_it(daemon: Any) -> None:
    with Session.attach(daemon.address, daemon.token()) as s:
        h = s.new_handle()
        s.upload(torch.ones(2), handle=h)
        s.upload(torch.zeros(3), handle=h)
        assert s.download(h).tolist() == [0.0, 0.0, 0.0]


def test_transfers_leave_tensors_resizable(daemon: Any) -> None:
    with Session.attach(daemon.address, daemon.token()) as s:
        mine = torch.ones(4)
        h = s.upload(mine)
        back = s.download(h)
        mine.resize_(100)  # the caller's tensor is untouched by the upload
        back.resize_(50)  # and a downloaded tensor is an ordinary one
        s.call("aten::resize_.default", Handle(h), [64], outputs=[0])
        assert s.download(h).shape == (64,)
