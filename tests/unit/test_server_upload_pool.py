"""server/uploadpool.py: a fake GPU's big upload lands in the host memory of an upload of the same size the same
session freed; never in memory anything of the session still refers to, never another session's, never read
before the upload wrote all of it; the idle memory kept is let go near the quota and after an allocation failed.
And gpupool/prefault.py `populate`, which faults a fresh upload chunk's pages in before the worker's copy."""

from __future__ import annotations

import ctypes
import mmap
import subprocess
import sys

import pytest
import torch
from gpupool.server import slices, uploadpool
from gpupool.server.devices import discover
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession

from gpupool import errors, hostpool, prefault, wire
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024 * 1024
CHUNK = wire.CHUNK_BYTES


def _session(quota: int = 256 * MiB, number: int = 1) -> WorkerSession:
    dev = discover("h", 1, 1024 * MiB)[0]
    assert dev.fake
    return WorkerSession("s", number, dev, DeviceMemory(dev), quota)


def _upload(ex: CommandExecutor, s: WorkerSession, h: int, t: torch.Tensor, chunks: int | None = None) -> None:
    """`t` uploaded under `h` in 4 MiB chunks, as the worker runs them (the first `chunks` only, when given)."""
    raw = wire.tensor_to_bytes(t)
    meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(t.dtype), shape=list(t.shape))
    pieces = [raw[o : o + CHUNK] for o in range(0, len(raw), CHUNK)]
    for k, piece in enumerate(pieces[:chunks]):
        up = device_pb2.Upload(handle=h, offset=k * CHUNK, data=piece, last=k == len(pieces) - 1)
        if k == 0:
            up.meta.CopyFrom(meta)
        ex._upload(s, up, memoryview(piece))


def _random(nbytes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit-exact (random bytes viewed as floats hold NaNs)."""
    return x.dtype == y.dtype and x.shape == y.shape and wire.tensor_to_bytes(x) == wire.tensor_to_bytes(y)


def test_a_later_upload_of_that_size_lands_in_the_freed_ones_memory() -> None:
    s, ex = _session(), CommandExecutor(slices.SliceLedger())
    a, b = _random(12 * MiB, 1).view(torch.float32), _random(12 * MiB, 2).view(torch.float32)
    h = s.handle_base + 1
    _upload(ex, s, h, a)
    where = s.tensors[h].data_ptr()
    assert _same(s.resolve(h), a) and s.used == 12 * MiB
    s.free([h])
    assert s.used == 0  # the kept memory is not the session's count: a freed upload frees quota as before
    _upload(ex, s, h + 1, b)
    assert s.tensors[h + 1].data_ptr() == where and s.upload_pool.reused == 1
    assert _same(s.resolve(h + 1), b) and s.used == 12 * MiB
    c = _random(16 * MiB, 3)  # another size: fresh memory
    _upload(ex, s, h + 2, c)
    assert s.tensors[h + 2].data_ptr() != where and _same(s.resolve(h + 2), c)


def test_memory_a_view_still_refers_to_is_not_reused() -> None:
    s, ex = _session(), CommandExecutor(slices.SliceLedger())
    a, b = _random(8 * MiB, 4), _random(8 * MiB, 5)
    h = s.handle_base + 1
    _upload(ex, s, h, a)
    s.bind(h + 1, s.tensors[h].view(2, -1)[1])  # an op's view of it, under another handle
    s.free([h])
    _upload(ex, s, h + 2, b)
    assert s.upload_pool.reused == 0
    assert _same(s.resolve(h + 1), a.view(2, -1)[1]) and _same(s.resolve(h + 2), b)
    s.free([h + 1])  # now nothing refers to it: the next upload of that size takes it
    _upload(ex, s, h + 3, a)
    assert s.upload_pool.reused == 1 and _same(s.resolve(h + 3), a)


def test_a_handle_still_held_or_replaced_keeps_its_memory() -> None:
    s, ex = _session(), CommandExecutor(slices.SliceLedger())
    a, b = _random(8 * MiB, 6), _random(8 * MiB, 7)
    h = s.handle_base + 1
    _upload(ex, s, h, a)
    old = s.tensors[h]
    _upload(ex, s, h, b)  # over the live handle: a new tensor (its old one is bound until the new one is)
    assert s.upload_pool.reused == 0 and old.data_ptr() != s.tensors[h].data_ptr()
    assert _same(old, a) and _same(s.resolve(h), b)


def test_a_half_written_upload_in_reused_memory_is_never_read() -> None:
    s, ex = _session(), CommandExecutor(slices.SliceLedger())
    a, b = _random(12 * MiB, 8), _random(12 * MiB, 9)
    h = s.handle_base + 1
    _upload(ex, s, h, a)
    s.free([h])
    _upload(ex, s, h + 1, b, chunks=1)  # the first chunk only: the rest of the memory is still a's bytes
    assert s.upload_pool.reused == 1
    with pytest.raises(errors.FailedPrecondition, match="still being uploaded"):
        s.resolve(h + 1)
    wrong = device_pb2.Upload(handle=h + 1, offset=2 * CHUNK, data=b"x" * CHUNK)  # skips a chunk
    with pytest.raises(errors.InvalidArgument, match="does not follow"):
        ex._upload(s, wrong, memoryview(wrong.data))


def test_each_session_reuses_its_own_memory_only() -> None:
    ex = CommandExecutor(slices.SliceLedger())
    s1, s2 = _session(number=1), _session(number=2)
    a = _random(8 * MiB, 10)
    _upload(ex, s1, s1.handle_base + 1, a)
    s1.free([s1.handle_base + 1])
    _upload(ex, s2, s2.handle_base + 1, a)
    assert s2.upload_pool.reused == 0 and s2.upload_pool is not s1.upload_pool
    s1.release_all()  # a session's end lets its kept memory go
    assert not s1.upload_pool.kept


def test_small_uploads_real_gpus_and_reuse_off_keep_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    s, ex = _session(), CommandExecutor(slices.SliceLedger())
    _upload(ex, s, s.handle_base + 1, _random(uploadpool.MIN_BYTES - 1, 11))
    assert not s.upload_pool.kept
    s.upload_pool.keep = 0
    _upload(ex, s, s.handle_base + 2, _random(uploadpool.MIN_BYTES, 12))
    assert not s.upload_pool.kept
    for text, keep in (("", uploadpool.DEFAULT_KEEP), ("0", 0), (" 1048576 ", MiB)):
        monkeypatch.setenv(uploadpool.ENV, text)
        assert hostpool.keep_from_env(uploadpool.ENV, uploadpool.DEFAULT_KEEP) == keep
    for text in ("-1", "lots", "1e9"):
        monkeypatch.setenv(uploadpool.ENV, text)
        with pytest.raises(ValueError, match=uploadpool.ENV):
            hostpool.keep_from_env(uploadpool.ENV, uploadpool.DEFAULT_KEEP)


def test_a_storage_grown_in_place_is_not_reused_at_its_old_size() -> None:
    s, ex = _session(), CommandExecutor(slices.SliceLedger())
    h = s.handle_base + 1
    _upload(ex, s, h, _random(8 * MiB, 13))
    s.tensors[h].resize_(9 * MiB)  # what an in-place resize_ op does (the session counts 9 MiB)
    s.recount([h], zero_growth=True)
    s.free([h])
    b = _random(8 * MiB, 14)
    _upload(ex, s, h + 1, b)
    assert s.upload_pool.reused == 0 and _same(s.resolve(h + 1), b) and s.used == 8 * MiB


def test_a_kept_storage_an_op_grew_is_let_go_when_the_session_frees_it() -> None:
    """The memory kept is at most the cache's size: a resize_ op grows the kept storage itself (the pool's tensor
    over it sees the new size); freed, it would stay kept at its new size, never offered again, counted at its old
    one, while the session's count drops by all of it."""
    s, ex = _session(), CommandExecutor(slices.SliceLedger())
    s.upload_pool = uploadpool.UploadPool(16 * MiB)
    h = s.handle_base + 1
    _upload(ex, s, h, _random(8 * MiB, 20))
    grow = device_pb2.Op(
        name="aten::resize_",
        args=[tensor_pb2.Arg(tensor=h), tensor_pb2.Arg(ints=tensor_pb2.IntList(values=[128 * MiB]))],
        outputs=[h],
    )
    ex.execute(s, device_pb2.Command(op=grow), lambda _: None)
    assert s.error is None and s.used == 128 * MiB
    s.free([h])
    assert s.used == 0
    assert sum(k.untyped_storage().nbytes() for k in s.upload_pool.kept) <= 16 * MiB
    assert s.upload_pool.held == 0
    b = _random(8 * MiB, 21)
    _upload(ex, s, h + 1, b)  # and uploads go on, into fresh memory
    assert s.upload_pool.reused == 0 and _same(s.resolve(h + 1), b)


def _idle(s: WorkerSession) -> int:
    return sum(k.nbytes for k in s.upload_pool.kept if s.upload_pool._idle(k))


def test_idle_memory_is_let_go_before_an_allocation_near_the_quota() -> None:
    s, ex = _session(quota=600 * MiB), CommandExecutor(slices.SliceLedger())
    for k in range(3):
        _upload(ex, s, s.handle_base + 1 + k, _random(16 * MiB, 15 + k))
    s.free([s.handle_base + 1, s.handle_base + 2, s.handle_base + 3])
    assert _idle(s) == 48 * MiB
    s.admit(64 * MiB)  # far from the quota: kept
    assert _idle(s) == 48 * MiB
    s.admit(600 * MiB - 20 * MiB)  # leaves 20 MiB: the two oldest go, one 16 MiB storage stays
    assert _idle(s) == 16 * MiB and s.upload_pool.held == 16 * MiB
    with pytest.raises(errors.ResourceExhausted):
        s.admit(601 * MiB)  # past the quota: refused as before, and nothing idle is left
    assert _idle(s) == 0 and s.upload_pool.held == 0


def test_near_the_quota_an_upload_in_use_is_no_longer_kept() -> None:
    s, ex = _session(quota=64 * MiB), CommandExecutor(slices.SliceLedger())
    h = s.handle_base + 1
    a = _random(16 * MiB, 19)
    _upload(ex, s, h, a)
    assert s.upload_pool.held == 16 * MiB
    s.admit(40 * MiB)  # 16 + 40 + 16 kept > 64: the kept one is in use, so it is only no longer offered
    assert s.upload_pool.held == 0 and not s.upload_pool.kept and _same(s.resolve(h), a)
    s.free([h])
    _upload(ex, s, h + 1, a)
    assert s.upload_pool.reused == 0 and _same(s.resolve(h + 1), a)


def test_an_allocation_that_failed_for_memory_lets_the_idle_memory_go() -> None:
    s, ex = _session(), CommandExecutor(slices.SliceLedger())
    _upload(ex, s, s.handle_base + 1, _random(8 * MiB, 18))
    s.free([s.handle_base + 1])
    assert _idle(s) == 8 * MiB
    cmd = device_pb2.Command(op=device_pb2.Op(name="aten::empty.memory_format"))
    ex._failed(s, cmd, RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried"), [])
    assert not s.upload_pool.kept and s.error is not None and s.error.code.name == "RESOURCE_EXHAUSTED"


def _resident(address: int, n: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    lo = address // prefault.PAGE * prefault.PAGE
    pages = -(-(address + n - lo) // prefault.PAGE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(pages * prefault.PAGE), vec) == 0
    return sum(b & 1 for b in vec)


def test_populate_faults_a_fresh_range_in_once_and_leaves_its_bytes() -> None:
    if not prefault._ok[0]:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE")
    m = mmap.mmap(-1, 32 * MiB)  # fresh pages for certain (a torch.empty this size may be a reused heap block)
    t = torch.frombuffer(m, dtype=torch.uint8)
    start = t.data_ptr() + 4 * MiB + 100  # not on a page boundary: its first and last pages are partly outside
    assert _resident(start, 4 * MiB) == 0
    assert prefault.populate(start, 4 * MiB)
    assert _resident(start, 4 * MiB) == 4 * MiB // prefault.PAGE + 1  # every page of it
    assert _resident(t.data_ptr() + 12 * MiB, 4 * MiB) == 0  # only the range asked for
    t[4 * MiB + 100 : 8 * MiB + 100] = 7
    assert not prefault.populate(start, 4 * MiB)  # in memory already: nothing asked
    assert not prefault.populate(start + 8 * MiB, 0)
    assert _resident(start + 8 * MiB, 4 * MiB) == 0
    assert bool((t[4 * MiB + 100 : 8 * MiB + 100] == 7).all()) and int(t[: 4 * MiB + 100].sum()) == 0
    del t
    m.close()


def test_the_daemon_refuses_a_malformed_cache_size() -> None:
    env = {"GPUPOOL_UPLOAD_CACHE": "half", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", "import gpupool.server.sessions"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and "GPUPOOL_UPLOAD_CACHE='half'" in out.stderr
