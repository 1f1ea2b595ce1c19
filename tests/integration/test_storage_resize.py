"""Command.resize_storage (server/storage_resize.py: torch's `untyped_storage().resize_`, FSDP2's free_storage and
alloc_storage) through a real daemon: the bytes a storage frees leave the session's count and those it regrows are
charged and zeroed; its handles are refused while their storage is resized away and come back with it; and the abuse
cases -- a size past any quota (RESOURCE_EXHAUSTED), a negative one, a shrink that would leave a view past the end, a
poisoned copy of a resized-away handle, another session's handle -- are refused with nothing changed. The daemon
before round 37 answered every resize "empty command" (no such command)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from gpupool.client.session import Handle, Session
from shim_fixtures import ServeProcess
from support import MiB, session_usage

from gpupool import errors
from gpupool._proto import device_pb2

QUOTA = 16 * MiB
N = 1024 * 1024  # floats: 4 MiB


@pytest.fixture(scope="module")
def served(serve: ServeProcess) -> ServeProcess:
    """The session-wide `gpupool serve` (conftest.py: serve); each test attaches sessions of its own."""
    return serve


@pytest.fixture
def s(served: ServeProcess) -> Iterator[Session]:
    with Session.attach(served.address, served.token(quota_bytes=QUOTA)) as session:
        yield session


def used(daemon: ServeProcess, s: Session) -> int:
    return session_usage(daemon.address, s).used_bytes


def resize(s: Session, handle: int, nbytes: int) -> None:
    s.command(device_pb2.Command(resize_storage=device_pb2.ResizeStorage(handle=handle, nbytes=nbytes)))


def synced(s: Session) -> None:
    s.sync()


def test_zero_and_back_frees_charges_and_zeroes(served: ServeProcess, s: Session) -> None:
    base = used(served, s)
    h = s.upload(torch.arange(float(N)))
    [view] = s.call("aten::slice.Tensor", Handle(h), 0, 8, 16)  # a second handle on the same storage
    [empty] = s.call("aten::slice.Tensor", Handle(h), 0, 0, 0)  # one with no elements: it stays usable
    synced(s)
    assert used(served, s) == base + 4 * N
    for cycle in range(4):  # repeated 0/n cycles keep the count exact
        resize(s, h, 0)
        synced(s)
        assert used(served, s) == base, cycle
        for gone in (h, view):
            s.call("aten::add.Tensor", Handle(gone), 1)
            with pytest.raises(errors.InvalidArgument, match="resized to 0 bytes"):
                synced(s)
        assert s.download(empty).numel() == 0
        resize(s, view if cycle % 2 else h, 4 * N)  # either handle names the storage, resized away or not
        synced(s)
        assert used(served, s) == base + 4 * N, cycle
        assert torch.equal(s.download(h), torch.zeros(N))  # the regrown bytes are zeroed, never old contents
        assert torch.equal(s.download(view), torch.zeros(8))
        s.call("aten::fill_.Scalar", Handle(h), 7.0, outputs=0)
    s.free([h, view, empty])
    synced(s)
    assert used(served, s) == base


def test_quota_refusal_and_freed_bytes_return_to_the_quota(served: ServeProcess, s: Session) -> None:
    base = used(served, s)
    h = s.upload(torch.ones(3 * N))  # 12 of the 16 MiB
    synced(s)
    resize(s, h, 1 << 40)  # far past the quota
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        synced(s)
    assert used(served, s) == base + 12 * N
    assert torch.equal(s.download(h), torch.ones(3 * N))  # nothing changed
    resize(s, h, 0)
    other = s.upload(torch.ones(3 * N))  # the freed 12 MiB are the session's again
    synced(s)
    resize(s, h, 12 * N)  # now past the quota: refused, and h stays resized away
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        synced(s)
    assert used(served, s) == base + 12 * N
    s.call("aten::neg.default", Handle(h))
    with pytest.raises(errors.InvalidArgument, match="resized"):
        synced(s)
    s.free([other])
    resize(s, h, 12 * N)
    synced(s)
    assert used(served, s) == base + 12 * N
    assert torch.equal(s.download(h), torch.zeros(3 * N))


@pytest.mark.parametrize("nbytes", [2**64 - 4, 2**62], ids=["negative", "past-2**62"])
def test_sizes_no_device_holds_are_refused(served: ServeProcess, s: Session, nbytes: int) -> None:
    h = s.upload(torch.ones(16))
    resize(s, h, nbytes)
    with pytest.raises(errors.InvalidArgument, match="below"):
        synced(s)
    assert torch.equal(s.download(h), torch.ones(16))


def test_a_shrink_a_view_reaches_past_is_refused(served: ServeProcess, s: Session) -> None:
    base = used(served, s)
    h = s.upload(torch.arange(64.0))
    [tail] = s.call("aten::slice.Tensor", Handle(h), 0, 32, 64)
    [head] = s.call("aten::slice.Tensor", Handle(h), 0, 0, 16)
    resize(s, h, 128)  # 32 floats: the whole tensor and `tail` reach past
    with pytest.raises(errors.InvalidArgument, match="reaches past"):
        synced(s)
    assert used(served, s) == base + 256
    assert torch.equal(s.download(tail), torch.arange(32.0, 64.0))
    resize(s, head, 0)  # through a view's handle: every handle with elements goes, the view's storage's too
    synced(s)
    assert used(served, s) == base
    resize(s, tail, 64)  # growing back to a size the named handle does not fit: refused
    with pytest.raises(errors.InvalidArgument, match="reaches past"):
        synced(s)
    resize(s, head, 64)  # 16 floats: `head` fits, `h` and `tail` stay resized away
    synced(s)
    assert used(served, s) == base + 64
    assert torch.equal(s.download(head), torch.zeros(16))
    s.call("aten::neg.default", Handle(tail))
    with pytest.raises(errors.InvalidArgument, match="resized"):
        synced(s)
    resize(s, head, 256)  # all of them back
    synced(s)
    assert torch.equal(s.download(h), torch.zeros(64))
    assert used(served, s) == base + 256


def test_a_poisoned_copy_of_a_resized_away_handle_cannot_resize(served: ServeProcess, s: Session) -> None:
    """An op that fails on a resized-away input poisons its outputs with that input's error: such an output names
    no storage (it would have let the session regrow the storage uncounted once its real handles were freed)."""
    base = used(served, s)
    h = s.upload(torch.ones(N))
    resize(s, h, 0)
    [out] = s.call("aten::neg.default", Handle(h))
    with pytest.raises(errors.InvalidArgument, match="resized"):
        synced(s)
    s.free([h])
    resize(s, out, 4 * N)
    with pytest.raises(errors.InvalidArgument, match="resized"):
        synced(s)
    assert used(served, s) == base
    s.free([out])
    resize(s, h, 4 * N)  # freed: as any freed handle
    with pytest.raises(errors.NotFound):
        synced(s)
    assert used(served, s) == base


def test_a_storage_only_resized_away_handles_hold_stays_counted(served: ServeProcess, s: Session) -> None:
    """Round 37 (fin37): an empty view's handle stays live when its storage goes to 0; grown back through it to a
    size the resized-away handle does not fit and then freed, the storage left the session's count while the
    resized-away handle still held its bytes -- 12 MiB a cycle past a 16 MiB quota, as many cycles as handles. Now the
    storage stays counted while any handle resized away holds it."""
    base = used(served, s)
    h = s.upload(torch.ones(3 * N))  # 12 of the 16 MiB
    [empty] = s.call("aten::slice.Tensor", Handle(h), 0, 0, 0)
    resize(s, h, 0)
    resize(s, empty, 12 * N - 4)  # `h` reaches 4 bytes past that: it stays resized away
    s.free([empty])
    synced(s)
    assert used(served, s) == base + 12 * N - 4  # held by `h`: counted (the base: `base`, nothing held)
    again = s.upload(torch.ones(3 * N))  # a second cycle's 12 MiB: past the quota now
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        synced(s)
    s.free([again])
    resize(s, h, 12 * N)  # back, its storage's bytes zeroed
    synced(s)
    assert used(served, s) == base + 12 * N
    assert torch.equal(s.download(h), torch.zeros(3 * N))
    s.free([h])
    synced(s)
    assert used(served, s) == base


def test_another_sessions_handle_is_denied(served: ServeProcess, s: Session) -> None:
    with Session.attach(served.address, served.token(quota_bytes=QUOTA, tenant="other")) as other:
        theirs = other.upload(torch.arange(8.0))
        other.sync()
        resize(s, theirs, 0)
        with pytest.raises(errors.PermissionDenied):
            synced(s)
        assert torch.equal(other.download(theirs), torch.arange(8.0))


def test_the_python_client_resizes_through_its_tensors(dev: torch.device) -> None:
    """The shim's `resize_storage` (client/fsdp.py's free_storage/alloc_storage there): in order with its ops, the
    size noted on the tensor, a view of the freed storage refused at the sync, the bytes back zeroed."""
    from gpupool.client.torch import RemoteError
    from gpupool.client.torch.tensor import resize_storage, storage_nbytes

    x = torch.arange(1024.0, device=dev)
    v = x[8:16]
    x.mul_(2)  # queued before the resize: it runs first
    resize_storage(x, 0)  # type: ignore[arg-type]
    assert storage_nbytes(x) == 0  # type: ignore[arg-type]
    with pytest.raises(RemoteError, match="resized to 0 bytes"):
        (v + 1).cpu()
    with pytest.raises(RuntimeError, match="negative"):
        resize_storage(x, -1)  # type: ignore[arg-type]
    resize_storage(x, 4096)  # type: ignore[arg-type]
    assert storage_nbytes(x) == 4096 and torch.equal(v.cpu(), torch.zeros(8))  # type: ignore[arg-type]
    x.copy_(torch.arange(1024.0))
    assert torch.equal(v.cpu(), torch.arange(8.0, 16.0))
