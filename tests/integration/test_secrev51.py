"""secrev51: review of round 50's daemon changes as a tenant with a valid token would attack them, against real daemons
on loopback. Round 50 (runner50) runs a slice's uploads and frees outside a learned run from their bytes in C++
(`CommandExecutor.run_between`, native_runner.cpp `Ctx::between_one`), where upb's message and `execute` ran them;
a client may send any bytes (`Session.send_commands`), bypassing every check its own library makes (cuda50's quota
refusal at the call in the C++ client is the client's: the daemon's is the one that holds). Each hostile command
goes in a frame of its own, outside any run, and must get the status and words `execute` gives it, change nothing
of another session, and leave the session's count equal to the bytes it holds (`Status`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.session import Session
from support import session_usage

from gpupool import errors, protocol, wire
from gpupool._proto import device_pb2

MiB = 1024**2
F32, BOOL = wire.dtype_to_proto(torch.float32), wire.dtype_to_proto(torch.bool)
U64 = (1 << 64) - 1


def _entry(body: bytes) -> bytes:
    """One `ClientFrame.commands` entry of a command's bytes."""
    return b"\x0a" + protocol.varint(len(body)) + body


def _upload(h: int, shape: list[int], data: bytes, dtype: int = F32) -> bytes:
    up = device_pb2.Upload(handle=h, data=data, last=True)
    up.meta.dtype, up.meta.shape[:] = dtype, shape
    return _entry(device_pb2.Command(upload=up).SerializeToString())


def _free(*handles: int) -> bytes:
    return _entry(device_pb2.Command(free=device_pb2.Free(handles=list(handles))).SerializeToString())


def _floats(n: int, v: float = 1.0) -> bytes:
    return wire.tensor_to_bytes(torch.full((n,), v))


@pytest.fixture
def pair(daemon_factory: Any) -> Iterator[tuple[Any, Session, Session]]:
    d = daemon_factory(fake_gpu_memory=64 * MiB)
    alice = Session.attach(d.address, d.token(quota_bytes=3 * MiB, tenant="alice51"))
    bob = Session.attach(d.address, d.token(quota_bytes=3 * MiB, tenant="bob51"))
    try:
        yield d, alice, bob
    finally:
        alice.close()
        bob.close()


def _bob_unharmed(d: Any, bob: Session, x: int) -> None:
    assert torch.equal(bob.download(x), torch.full((256,), 7.0))
    assert session_usage(d.address, bob).used_bytes == 1024


def _refused(s: Session, raw: bytes, code: grpc.StatusCode, words: str) -> errors.GpupoolError:
    s.send_commands(raw)
    with pytest.raises(errors.GpupoolError, match=words) as info:
        s.sync()
    assert info.value.code == code, (info.value.code, info.value.message)
    return info.value


def test_free_outside_a_run_of_another_sessions_or_the_reserved_handle(pair: tuple[Any, Session, Session]) -> None:
    """A Free of [own, bob's live handle, own] outside a run (`Ctx::between_one`'s free: `free_loop` calls
    `check_handle`): PERMISSION_DENIED, the handle before it freed and the one after kept (as `WorkerSession.free`),
    alice's count her one live KiB, bob's tensor and count untouched; the reserved handle INVALID_ARGUMENT, the
    all-ones handle PERMISSION_DENIED; a freed handle freed again is harmless; the session goes on."""
    d, alice, bob = pair
    x = bob.upload(torch.full((256,), 7.0))
    bob.sync()
    a, b = alice.new_handle(), alice.new_handle()
    alice.send_commands(_upload(a, [256], _floats(256)) + _upload(b, [256], _floats(256, 2.0)))
    alice.sync()
    assert session_usage(d.address, alice).used_bytes == 2048
    _refused(alice, _free(a, x, b), grpc.StatusCode.PERMISSION_DENIED, "belongs to another session")
    assert session_usage(d.address, alice).used_bytes == 1024  # a freed, b kept
    with pytest.raises(errors.NotFound):
        alice.download(a)
    assert torch.equal(alice.download(b), torch.full((256,), 2.0))
    _bob_unharmed(d, bob, x)
    _refused(alice, _free(alice.handle_base), grpc.StatusCode.INVALID_ARGUMENT, "reserved")
    _refused(alice, _free(U64), grpc.StatusCode.PERMISSION_DENIED, "belongs to another session")
    alice.send_commands(_free(a, a))
    alice.sync()
    assert session_usage(d.address, alice).used_bytes == 1024
    alice.send_commands(_free(b))
    alice.sync()
    assert session_usage(d.address, alice).used_bytes == 0
    _bob_unharmed(d, bob, x)


@pytest.mark.parametrize(
    ("what", "shape", "n", "dtype", "code", "words"),
    [
        ("reserved", [4], 16, F32, grpc.StatusCode.INVALID_ARGUMENT, "reserved"),
        ("bob's", [256], 1024, F32, grpc.StatusCode.PERMISSION_DENIED, "belongs to another session"),
        ("strides overflow", [0, 1 << 62, 1 << 62], 0, F32, grpc.StatusCode.INVALID_ARGUMENT, "overflow"),
        ("count overflow", [1 << 62, 2, 0], 0, F32, grpc.StatusCode.INVALID_ARGUMENT, "overflow"),
        ("65 dims", [1] * 65, 4, F32, grpc.StatusCode.INVALID_ARGUMENT, "bad upload shape"),
        ("a negative size", [-4], 16, F32, grpc.StatusCode.INVALID_ARGUMENT, "bad upload shape"),
        ("a bool of 2", [4], 4, BOOL, grpc.StatusCode.INVALID_ARGUMENT, "bool"),
        ("a byte short", [4], 15, F32, grpc.StatusCode.INVALID_ARGUMENT, "upload ended at 15 of 16"),
        ("a byte over", [4], 17, F32, grpc.StatusCode.INVALID_ARGUMENT, "17 does not follow 0 of 16"),
        ("no dtype", [4], 16, 9999, grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    ],
)
def test_hostile_upload_outside_a_run(
    pair: tuple[Any, Session, Session], what: str, shape: list[int], n: int, dtype: int, code: Any, words: str
) -> None:
    """An upload of hostile bytes outside a run (the runner reads it, declines, and Python's `_upload` refuses it):
    the status `execute` gives, nothing bound or counted for alice, bob's tensor and count untouched, alice going on."""
    d, alice, bob = pair
    x = bob.upload(torch.full((256,), 7.0))
    bob.sync()
    h = {"reserved": alice.handle_base, "bob's": x}.get(what, alice.new_handle())
    data = b"\x02\x00\x01\x00" if dtype == BOOL else bytes(n)
    _refused(alice, _upload(h, shape, data, dtype), code, words)
    assert session_usage(d.address, alice).used_bytes == 0, what
    _bob_unharmed(d, bob, x)
    y = alice.new_handle()
    alice.send_commands(_upload(y, [4], _floats(4, 3.0)))
    assert torch.equal(alice.download(y), torch.full((4,), 3.0))
    assert session_usage(d.address, alice).used_bytes == 16


def test_upload_over_the_quota_from_a_client_that_skips_its_own_check(pair: tuple[Any, Session, Session]) -> None:
    """cuda50's refusal at the call is the client's; a client that sends the bytes anyway (a 4 MiB chunk on a 3 MiB
    quota, a 2 MiB one beside 2 MiB held, a 2 MiB one over a held 2 MiB handle: the new bytes are admitted before
    the old ones go) meets the daemon's RESOURCE_EXHAUSTED, with its own use and quota; its count is what it holds
    after each (a refused upload's handle is poisoned: its old value goes)."""
    d, alice, bob = pair
    x = bob.upload(torch.full((256,), 7.0))
    bob.sync()
    big = alice.new_handle()
    err = _refused(
        alice, _upload(big, [MiB], bytes(4 * MiB)), grpc.StatusCode.RESOURCE_EXHAUSTED, "memory quota exceeded"
    )
    assert (err.used_bytes, err.limit_bytes) == (0, 3 * MiB), err.message
    assert session_usage(d.address, alice).used_bytes == 0
    h, k = alice.new_handle(), alice.new_handle()
    alice.send_commands(_upload(h, [MiB // 2], bytes(2 * MiB)))
    alice.sync()
    assert session_usage(d.address, alice).used_bytes == 2 * MiB
    err = _refused(alice, _upload(k, [MiB // 2], bytes(2 * MiB)), grpc.StatusCode.RESOURCE_EXHAUSTED, "quota")
    assert (err.used_bytes, err.limit_bytes) == (2 * MiB, 3 * MiB), err.message
    assert session_usage(d.address, alice).used_bytes == 2 * MiB
    _refused(alice, _upload(h, [MiB // 2], bytes(2 * MiB)), grpc.StatusCode.RESOURCE_EXHAUSTED, "quota")
    assert session_usage(d.address, alice).used_bytes == 0  # h poisoned, its 2 MiB let go
    with pytest.raises(errors.ResourceExhausted):
        alice.download(h)
    _bob_unharmed(d, bob, x)


def test_those_commands_reach_the_runner_outside_a_run(daemon_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands above take round 50's path (`CommandExecutor.run_between`, seen in the daemon's process under
    `--isolation thread`): a well-formed upload and a free the runner runs itself (True), the free that names bob's
    handle or the reserved one run there too and failed (True, the session's error set), a hostile upload left to
    Python (False): `execute` then refuses it."""
    from gpupool.server.executor import CommandExecutor

    seen: list[tuple[int, int, bool, bool]] = []
    real = CommandExecutor.run_between

    def spy(self: Any, s: Any, raw: bytes, reply: Any) -> bool:
        ran = real(self, s, raw, reply)
        seen.append((s.handle_base, raw[0], ran, s.error is not None))
        return ran

    monkeypatch.setattr(CommandExecutor, "run_between", spy)
    d = daemon_factory(fake_gpu_memory=64 * MiB, isolation="thread")
    alice = Session.attach(d.address, d.token(quota_bytes=3 * MiB, tenant="alice51"))
    bob = Session.attach(d.address, d.token(quota_bytes=3 * MiB, tenant="bob51"))
    try:
        x = bob.upload(torch.full((256,), 7.0))
        bob.sync()
        a, b = alice.new_handle(), alice.new_handle()
        alice.send_commands(_upload(a, [256], _floats(256)) + _upload(b, [256], _floats(256)))
        alice.sync()
        _refused(alice, _free(a, x), grpc.StatusCode.PERMISSION_DENIED, "belongs to another session")
        _refused(alice, _free(alice.handle_base), grpc.StatusCode.INVALID_ARGUMENT, "reserved")
        _refused(alice, _upload(b, [0, 1 << 62, 1 << 62], b""), grpc.StatusCode.INVALID_ARGUMENT, "overflow")
        mine = [got[1:] for got in seen if got[0] == alice.handle_base]
        assert mine == [(0x12, True, False), (0x12, True, False), (0x22, True, True), (0x22, True, True),
                        (0x12, False, False)], mine  # fmt: skip
        assert session_usage(d.address, alice).used_bytes == 0  # (b poisoned by its failed upload)
        _bob_unharmed(d, bob, x)
    finally:
        alice.close()
        bob.close()
