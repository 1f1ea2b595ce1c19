"""The "conv_layout" feature (round 43, gpupool/protocol.py): a convolution's output is channels_last where its input
or weight is, as on a GPU, only where the client asked for it at Attach and the daemon names it. Both sides must
agree (a view of the output travels as the geometry the client computed), so each mix of versions is pinned here on
real daemons: a client that does not ask (a bare Session, as every client before round 43) still gets contiguous
outputs from a new daemon; a torch client of a daemon that withholds the feature (GPUPOOL_WITHHOLD_FEATURES, as a
daemon before round 43) computes contiguous outputs too; a process whose first daemon lays outputs out as cuDNN does
refuses a later daemon that does not, in one RuntimeError, rather than read views of its outputs out of order.
tests/integration/test_cuda_scripts.py runs the layouts through `gpupool run --cuda` on both clients."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from gpupool.client.session import Handle, Session
from scheduler_fixtures import ROOT
from shim_fixtures import ServeProcess, withholding_daemon

from gpupool import protocol

CL = torch.channels_last


@pytest.fixture(scope="module")
def old_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A daemon that withholds "conv_layout", as one from before round 43."""
    yield from withholding_daemon(tmp_path_factory, protocol.FEATURE_CONV_LAYOUT)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 6, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g)


def _conv_read_as(s: Session, fmt: torch.memory_format) -> torch.Tensor:
    """A channels_last conv on the daemon, its output read through a view of `fmt`'s geometry (as a client sends the
    view it computed: `as_strided` of the output's own strides)."""
    x, w = _inputs()
    hx = s.call("aten::clone", Handle(s.upload(x)), memory_format=CL)[0]
    out = s.call("aten::convolution", Handle(hx), Handle(s.upload(w)), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    shape = (2, 4, 4, 4)
    strides = torch.empty(shape).to(memory_format=fmt).stride()
    [view] = s.call("aten::as_strided", Handle(out[0]), list(shape), list(strides), 0)
    [flat] = s.call("aten::clone", Handle(view), memory_format=torch.contiguous_format)
    return s.download(Handle(flat))


def test_a_session_lays_conv_outputs_out_channels_last_only_where_its_client_asked(serve: Any) -> None:
    """A bare session (no features asked: every client before round 43) reads a channels_last conv's output as
    contiguous from a new daemon, as before; one that asks for "conv_layout" reads it as channels_last. Both read the
    CPU's values through the geometry they expect."""
    x, w = _inputs()
    want = F.conv2d(x.to(memory_format=CL), w)
    with Session.attach(serve.address, serve.token(tenant="old-client")) as s:
        assert protocol.FEATURE_CONV_LAYOUT in s.features  # the daemon names it; the session did not ask
        assert torch.allclose(_conv_read_as(s, torch.contiguous_format), want, rtol=1e-5, atol=1e-6)
    with Session.attach(serve.address, serve.token(tenant="new-client"), features=[protocol.FEATURE_CONV_LAYOUT]) as s:
        assert torch.allclose(_conv_read_as(s, CL), want, rtol=1e-5, atol=1e-6)


def test_a_daemon_withholding_it_ignores_the_request(old_daemon: Any) -> None:
    """A client that asks a daemon that does not name "conv_layout" (one before round 43 never read the field) gets
    contiguous outputs."""
    x, w = _inputs()
    want = F.conv2d(x.to(memory_format=CL), w)
    ask = [protocol.FEATURE_CONV_LAYOUT]
    with Session.attach(old_daemon.address, old_daemon.token(tenant="asks"), features=ask) as s:
        assert protocol.FEATURE_CONV_LAYOUT not in s.features
        assert torch.allclose(_conv_read_as(s, torch.contiguous_format), want, rtol=1e-5, atol=1e-6)


MIXED = """
import sys
import torch
import torch.nn.functional as F
first, second = sys.argv[1:3], sys.argv[3:5]
if sys.argv[5] == "native":  # the C++ client, attached by hand as the benches do (gpupool.torch.attach is the shim's)
    from gpupool.client import native
    native.enable()
    torch.ops.gpupool_native.set_device_count(2)
    def attach(address, token, index=[0]):
        native.attach(address, token, index[0])
        index[0] += 1
        return torch.device("gpupool", index[0] - 1)
else:
    import gpupool.torch as gt
    attach = gt.attach
g = torch.Generator().manual_seed(0)
x, w = torch.randn(2, 3, 6, 6, generator=g).to(memory_format=torch.channels_last), torch.randn(4, 3, 3, 3, generator=g)
want = torch.flatten(F.conv2d(x, w), 1)
d0 = attach(*first)
y = F.conv2d(x.to(d0), w.to(d0))
print("first", y.is_contiguous(memory_format=torch.channels_last), torch.allclose(torch.flatten(y, 1).cpu(), want))
try:
    d1 = attach(*second)
except RuntimeError as exc:
    print("refused", exc)
else:
    y = F.conv2d(x.to(d1), w.to(d1))
    print("second", y.is_contiguous(memory_format=torch.channels_last), torch.allclose(torch.flatten(y, 1).cpu(), want))
"""


@pytest.mark.parametrize("client", ["shim", "native"])
def test_one_process_keeps_its_first_daemons_layout(serve: Any, old_daemon: Any, client: str) -> None:
    """Both clients: a process whose first daemon names "conv_layout" lays conv outputs out channels_last and refuses
    a later daemon that withholds it (one RuntimeError naming the daemon and the feature); a process whose first daemon
    withholds it keeps contiguous outputs on a new daemon too (it does not ask). Views read the CPU's values."""
    if client == "native":
        from gpupool.client.native.backend import compiler_missing

        why = compiler_missing()
        if why is not None:
            pytest.skip(f"C++ client: {why}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    new = [serve.address, serve.token(tenant=f"mixed-{client}")]
    old = [old_daemon.address, old_daemon.token(tenant=f"mixed-{client}")]

    def run(*args: str) -> str:
        cmd = [sys.executable, "-c", MIXED, *args, client]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    out = run(*new, *old)
    assert "first True True\n" in out, out
    assert f"refused the gpupool daemon at {old[0]} lays convolution outputs out contiguous" in out, out
    assert protocol.FEATURE_CONV_LAYOUT in out
    out = run(*old, *new)
    assert "first False True\nsecond False True\n" in out, out


def _cl_training(d: Any, captured: bool) -> tuple[list[float], bool]:
    import gpupool.torch as gt

    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1), torch.nn.Flatten(), torch.nn.Linear(32, 1)
    ).to(d, memory_format=CL)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        y = model[:3](x)
        loss = (model[3:](y).square().mean() + y.movedim(1, -1)[:, 0, 0].sum()) * 0.5  # a view of the conv's output
        loss.backward()
        opt.step()
        return loss

    fn = gt.capture(step) if captured else step
    g = torch.Generator().manual_seed(0)
    losses = [fn(torch.randn(2, 3, 6, 6, generator=g).to(d, memory_format=CL)).item() for _ in range(4)]
    if captured:
        assert fn.state == "replay" and fn.stats["replayed"] >= 1
    layout = model[:1](torch.ones(1, 3, 6, 6).to(d, memory_format=CL)).is_contiguous(memory_format=CL)
    return losses, layout


def test_a_captured_step_of_channels_last_convs_trains_as_on_the_cpu(dev: torch.device) -> None:
    """A captured step (gpupool.torch.capture) of a channels_last conv net, with a view of a conv's output: the graph
    the daemon defines lays the convs' outputs out as the client computed them, channels_last (the session's
    "conv_layout", which graph definitions' meta runs and replays follow too), and the losses are the CPU's. It trained
    so before round 43 too, with contiguous outputs (pinned: the graph path under the new layout)."""
    losses, layout = _cl_training(dev, captured=True)
    want, cpu_layout = _cl_training("cpu", captured=False)
    assert layout and cpu_layout
    assert losses == pytest.approx(want, rel=1e-5)
