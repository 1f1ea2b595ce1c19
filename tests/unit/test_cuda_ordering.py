"""CUDA-only paths of rounds 32-35 that no `cuda` test ran yet, each against what the device actually orders (round 36,
gpu36's reading of them against torch 2.11/2.13's sources):

- a session's pinned staging buffers given back (its end) while a copy from one is still queued: torch's caching host
  allocator must not hand that block out again before the copy ran (the non-blocking copy's `recordEvent`, Copy.cu);
- an upload staged in a slice that returns before the GPU ran it (the slice timer's run-ahead, devices.SliceTimer):
  a read of the tensor in the next slice sees every byte;
- a CUDA graph's capture and replays in slices that run ahead (the timer's events pending on the stream while
  torch.cuda.graph synchronizes and captures on its own stream), inputs staged into the capture's own;
- a view bound to a handle over a bigger CUDA storage: the rest zeroed on the device (sessions.`_zero_outside`).

No GPU was lent when these were written: every one of them skips here and has never run (bench/real_gpu.sh's `tests`
stage runs them)."""

from __future__ import annotations

import pytest
import torch
from gpupool.server import staging
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import WorkerSession
from test_graph_cuda import _define, _run
from test_server_graph import _no_reply, op, slot
from test_staging_cuda import _session

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KiB = 1024
SLEEP = 200_000_000  # torch.cuda._sleep cycles: ~0.1 s of the device's time queued ahead of what follows


def _upload(ex: CommandExecutor, s: WorkerSession, h: int, x: torch.Tensor) -> None:
    meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(x.dtype), shape=list(x.shape))
    up = device_pb2.Upload(handle=h, meta=meta, data=wire.tensor_to_bytes(x), last=True)
    ex.execute(s, device_pb2.Command(upload=up), _no_reply)
    assert s.error is None, s.error


@cuda
def test_buffers_given_back_with_a_copy_queued_are_not_handed_out_before_it_ran() -> None:
    """The session's end (`close`) with its copy still queued behind ~0.1 s of the device's work, then another
    staging's buffers of the same size, written at once: if the caching host allocator gave the first block out
    again, the queued copy would read the second staging's bytes."""
    first = staging.Staging(torch.device("cuda"))
    torch.cuda._sleep(SLEEP)
    queued = _copies(first, [1])
    first.close()
    second = staging.Staging(torch.device("cuda"))
    later = _copies(second, [2, 3, 4, 5])
    torch.cuda.synchronize()
    for value, dst in enumerate(queued + later, start=1):
        assert bool((dst == value).all()), value
    second.close()


def _copies(st: staging.Staging, values: list[int]) -> list[torch.Tensor]:
    """A 256 KiB device tensor for each value, its bytes that value, staged through `st`."""
    dsts = [torch.empty(256 * KiB, dtype=torch.uint8, device="cuda") for _ in values]
    assert all(st.copy(dst, bytes([v]) * (256 * KiB)) for dst, v in zip(dsts, values, strict=True))
    return dsts


@cuda
def test_an_upload_staged_in_a_slice_that_runs_ahead_is_whole_in_the_next_slice() -> None:
    ex, s = _session()
    timer = s.device.slice_timer()
    x = torch.randn(64 * KiB, generator=torch.Generator().manual_seed(4))
    h = s.handle_base + 1
    with timer():
        torch.cuda._sleep(SLEEP)
        _upload(ex, s, h, x)
    assert timer.busy  # the slice returned with the upload's copy still queued
    assert s.staging is not None and s.staging.copies == 1
    with timer():  # a Get's copy to the host: torch's pageable copy, on the same stream, after the upload's
        got = s.tensors[h].cpu()
    assert torch.equal(got, x)
    with timer():
        timer.settle()
    assert not timer.busy and timer.reported > 0.0


@cuda
def test_a_capture_and_its_replays_in_slices_that_run_ahead() -> None:
    """A graph's two eager runs, its capture and replays, each in a slice of the session's timer that does not wait
    for the GPU (a queued sleep keeps slices pending): the outputs are the step's, every slice is booked once."""
    ex, s = _session()
    timer = s.device.slice_timer()
    times3 = op("aten::mul.Scalar", slot(1), tensor_pb2.Arg(f=3.0), out=(2,))
    g = _define(ex, s, [times3], [torch.zeros(32, 64)], [], [2])
    out = s.handle_base + 100
    gen = torch.Generator().manual_seed(6)
    reported = 0.0
    for k in range(6):
        x = torch.randn(32, 64, generator=gen)
        with timer() as seconds:
            torch.cuda._sleep(SLEEP // 10)
            run = device_pb2.RunGraph(graph_id=1, inputs=[0], outputs=[out])
            run.input_data.append(x.numpy().tobytes())
            ex.execute(s, device_pb2.Command(run_graph=run), _no_reply)
            assert s.error is None, s.error
        reported += seconds[0]
        assert torch.equal(s.tensors[out].cpu(), x * 3), k
    assert g.cuda is not None  # captured as a CUDA graph, replayed from the pinned buffer
    [y] = _run(ex, s, [torch.ones(32, 64)], [out])
    assert torch.equal(y, torch.full((32, 64), 3.0))
    with timer() as seconds:
        timer.settle()
    reported += seconds[0]
    assert not timer.busy and reported == pytest.approx(timer.reported) and reported > 0.0


@cuda
def test_a_view_bound_over_a_bigger_cuda_storage_has_the_rest_zeroed() -> None:
    _, s = _session()
    whole = torch.full((1024,), 7.0, device="cuda")
    view = whole[8:12]
    s.bind(s.handle_base + 1, view)
    got = whole.cpu()
    assert bool((got[8:12] == 7.0).all())
    assert bool((got[:8] == 0).all()) and bool((got[12:] == 0).all())
