"""The `RngState` command (round 43, feature "rng_state": docs/wire.md): a session reads and loads its own generator's
state on the daemon (torch.cuda.get_rng_state / set_rng_state and torch.random.fork_rng under --cuda, which
tests/integration/test_cuda_scripts.py runs on both clients). Here on the wire: a state read and loaded back repeats
the draws; what the daemon refuses (another dtype or shape, a state torch refuses, both or neither handle, another
session's handle) is INVALID_ARGUMENT or PERMISSION_DENIED at the next sync with the session serving on; a daemon that
withholds the feature refuses the command, and the client refuses the calls without sending them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from shim_fixtures import ServeProcess, withholding_daemon

from gpupool import errors, protocol
from gpupool._proto import device_pb2


@pytest.fixture(scope="module")
def old_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A daemon that withholds "rng_state", as one from before round 43."""
    yield from withholding_daemon(tmp_path_factory, protocol.FEATURE_RNG_STATE)


def _draw(s: Session, n: int = 4) -> torch.Tensor:
    [h] = s.call("aten::rand", [n], dtype=torch.float32)
    return s.download(Handle(h))


def test_a_state_read_and_loaded_back_repeats_the_draws(serve: Any) -> None:
    with Session.attach(serve.address, serve.token(tenant="rng")) as s:
        assert protocol.FEATURE_RNG_STATE in s.features
        s.seed(7)
        first = _draw(s)
        state = s.rng_state()
        assert state.dtype == torch.uint8 and state.shape == (5056,)  # a fake GPU's generator is the CPU's
        local = torch.Generator().manual_seed(7)
        assert torch.equal(first, torch.rand(4, generator=local)) and torch.equal(state, local.get_state())
        a = _draw(s)
        s.set_rng_state(state)
        assert torch.equal(_draw(s), a)
        s.set_rng_state(torch.Generator().manual_seed(3).get_state())  # a state made elsewhere loads too
        assert torch.equal(_draw(s), torch.rand(4, generator=torch.Generator().manual_seed(3)))


def test_what_the_daemon_refuses_fails_at_the_next_sync_and_the_session_goes_on(serve: Any) -> None:
    with (
        Session.attach(serve.address, serve.token(tenant="rng-bad")) as s,
        Session.attach(serve.address, serve.token(tenant="rng-other")) as other,
    ):
        s.seed(1)
        before = s.rng_state()
        cases = [
            (s.upload(torch.zeros(5056, dtype=torch.uint8)), errors.InvalidArgument, "not a generator state"),
            (s.upload(torch.zeros(16, dtype=torch.uint8)), errors.InvalidArgument, "not a generator state"),
            (s.upload(torch.zeros(5056, dtype=torch.float32)), errors.InvalidArgument, "1-dim uint8"),
            (s.upload(before.reshape(2, -1)), errors.InvalidArgument, "1-dim uint8"),
            (other.upload(before), errors.PermissionDenied, "session"),
        ]
        for h, kind, match in cases:
            s.command(device_pb2.Command(rng_state=device_pb2.RngState(set=h)))
            with pytest.raises(kind, match=match):
                s.sync()
        for both in (device_pb2.RngState(), device_pb2.RngState(get=s.new_handle(), set=cases[0][0])):
            s.command(device_pb2.Command(rng_state=both))
            with pytest.raises(errors.InvalidArgument, match="one handle"):
                s.sync()
        assert torch.equal(s.rng_state(), before)  # nothing refused moved the generator
        with pytest.raises(TypeError, match="ByteTensor"):
            s.set_rng_state(torch.zeros(3))


def test_a_daemon_without_it_refuses_the_command_and_the_client_the_calls(old_daemon: Any) -> None:
    with Session.attach(old_daemon.address, old_daemon.token(tenant="rng-old")) as s:
        assert protocol.FEATURE_RNG_STATE not in s.features
        with pytest.raises(RuntimeError, match="does not name the 'rng_state' feature"):
            s.rng_state()
        with pytest.raises(RuntimeError, match="does not name the 'rng_state' feature"):
            s.set_rng_state(torch.zeros(5056, dtype=torch.uint8))
        s.command(device_pb2.Command(rng_state=device_pb2.RngState(get=s.new_handle())))
        with pytest.raises(errors.InvalidArgument, match="withholds the rng_state feature"):
            s.sync()
        assert _draw(s).shape == (4,)
