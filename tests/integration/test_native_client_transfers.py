"""The C++ client's transfers of any size against a real daemon (`gpupool serve`, fake GPUs, loopback, TLS), with
and without the bulk side port (`--bulk-listen`): an upload over 12 MiB (a frame holds 12 MiB of it at most, under the
daemon's 16 MiB frame: 32 MiB until round 47, when one of 16-32 MiB ended the session; round 17 sends the larger ones
through Session.upload, as the Python client's go), of 20 MB and of 40 MB, into a whole new tensor and into a slice
of one, and downloads over 32 MiB and over gRPC's 64 MiB message limit, come back bit for bit and compute as local
CPU does; an upload over the session's quota is the daemon's OutOfMemoryError at the next sync, and the session goes on.

The C++ client must own PrivateUse1 (this pytest process has given it to the shim), so each case runs in a child
(TORCH_DEVICE_BACKEND_AUTOLOAD=0) that prints JSON. Skipped without a C++ compiler or ninja.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpupool.client.native.backend import compiler_missing
from shim_fixtures import ServeProcess, start_daemon
from support import stop_process

ROOT = Path(__file__).resolve().parents[2]
_why = compiler_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why is not None, reason=f"native client: {_why}")]
MiB = 1024 * 1024

CHILD = """
import json, sys
import torch
from gpupool.client.native import backend as nc
from gpupool.client.session import Session

nc.load()
nc.claim()
session = Session.attach(sys.argv[1], sys.argv[2], timeout=120.0)
nc.connect(session)
dev = nc.device()
out = {"bulk": session._side is not None}
g = torch.Generator().manual_seed(0)
x = torch.randn(10_000_000, generator=g)  # 40 MB: over the frame's 32 MiB
d = x.to(dev)  # a new tensor: the upload fills its handle
out["whole"] = torch.equal(d.cpu(), x)
out["ops"] = [(d * 3 + 1).sum().item(), (x * 3 + 1).sum().item()]
two = torch.zeros(3, 10_000_000, device=dev)  # a slice of a tensor the daemon has: a temporary handle and copy_
two[1].copy_(x)
two[2] = x.flip(0)
want = torch.zeros(3, 10_000_000)
want[1].copy_(x)
want[2] = x.flip(0)
out["slices"] = torch.equal(two.cpu(), want)  # a 120 MB download: over gRPC's 64 MiB message limit
out["slice_ops"] = [two.sum(1).tolist(), want.sum(1).tolist()]
m = torch.randn(5_000_000, generator=g)  # 20 MB: over the daemon's 16 MiB frame, under the 32 MiB of round 46's frame
out["mid"] = torch.equal(m.to(dev).cpu(), m)  # (until round 47 the daemon refused its frame: the session ended)
h = torch.randint(0, 2**62, (5_000_000,), generator=g)  # int64, 40 MB: another dtype
out["int64"] = torch.equal(h.to(dev).cpu(), h)
w = torch.randn(32000, 256, generator=g)  # 32.8 MB, under 32 MiB: until round 47 inside one frame, over the daemon's
out["embedding"] = [(w.to(dev) * 2).sum().item(), (w * 2).sum().item()]  # 16 MiB message limit (refused)
del d, two
out["uploads"] = nc.stats()["uploads"]  # the transfers' (before the quota's)
if session.quota_bytes:
    try:
        big = torch.ones(session.quota_bytes // 4 + MiB, dtype=torch.float32)
        torch.gpupool.synchronize()
        over = big.to(dev)
        over.sum().item()
        out["quota"] = {}
    except Exception as exc:
        out["quota"] = {"type": type(exc).__name__, "message": str(exc).splitlines()[0],
                        "torch_oom": isinstance(exc, torch.OutOfMemoryError)}
    del big
    out["after"] = [(x.to(dev) * 2).sum().item(), (x * 2).sum().item()]
try:  # 20 MB, whole and into a slice: over the daemon's default 16 MiB message (round 47: it ended the session)
    m = torch.randn(5_000_000, generator=g)
    md = m.to(dev)
    pair = torch.zeros(2, 5_000_000, device=dev)
    pair[1].copy_(m)  # into a slice: a temporary handle and copy_
    out["mid2"] = [torch.equal(md.cpu(), m), torch.equal(pair[1].cpu(), m)]
    out["mid2"].append((md * 2).sum().item() == (m * 2).sum().item())
    del md, pair
except Exception as exc:
    out["mid2"] = type(exc).__name__ + ": " + str(exc)[:300]
print(json.dumps(out))
""".replace("MiB", str(MiB))


@pytest.fixture(scope="module", params=["stream", "bulk"])
def daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, serve: ServeProcess
) -> Iterator[tuple[ServeProcess, bool]]:
    """(daemon, bulk): stream: the session's shared `gpupool serve` (conftest.py: serve, no bulk port); bulk: one of
    this module's own with `--bulk-listen`."""
    if request.param == "stream":
        yield serve, False
        return
    d = start_daemon(tmp_path_factory.mktemp("bulk"), "1GiB", 1, "--bulk-listen", "127.0.0.1:0")
    yield d, True
    stop_process(d.process)


@pytest.fixture(scope="module")
def ran(daemon: tuple[ServeProcess, bool]) -> dict[str, Any]:
    """One child per daemon does the transfers and then the quota overrun (a session with a 320 MiB quota: the
    transfers hold 200 MB at most, and free them before the overrun); both tests read its JSON."""
    d, bulk = daemon
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, d.address, d.token(quota_bytes=320 * MiB)], env=env,
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    got["daemon_bulk"] = bulk
    return got


def test_uploads_and_downloads_over_16_and_32_mib_are_bit_for_bit(ran: dict[str, Any]) -> None:
    got = ran
    assert got["bulk"] is got["daemon_bulk"]
    assert got["whole"] and got["slices"] and got["int64"] and got["mid"]
    assert got["ops"][0] == got["ops"][1]
    assert got["slice_ops"][0] == got["slice_ops"][1]
    assert got["uploads"] >= 4


def test_uploads_of_16_to_32_mib_go_through_on_a_default_daemon(ran: dict[str, Any]) -> None:
    """Round 47: the C++ client wrote uploads of up to 32 MiB into its frame, and a frame of 16 MiB or more is over the
    daemon's default --max-message-size: gRPC refused it on the stream, the side socket's reader ended the session.
    Over 12 MiB they now go through Session.upload (4 MiB chunks: on the side socket, or a frame each)."""
    assert ran["mid2"] == [True, True, True], ran["mid2"]


def test_an_upload_over_the_quota_is_the_daemons_oom_and_the_session_goes_on(ran: dict[str, Any]) -> None:
    got = ran
    q = got["quota"]
    assert q.get("type") == "OutOfMemoryError" and q["torch_oom"], q
    assert "memory quota exceeded" in q["message"], q
    assert got["after"][0] == got["after"][1]


THRESHOLD_CHILD = """
import json, sys
import torch
from gpupool.client.native import backend as nc
from gpupool.client.session import Session

nc.load()
nc.claim()
session = Session.attach(sys.argv[1], sys.argv[2], timeout=120.0)
other = Session.attach(sys.argv[1], sys.argv[3], timeout=120.0)  # a neighbour on the same device
nc.connect(session)
dev = nc.device()
out = {"bulk": session._side is not None, "sizes": {}}
for n in (MiB - 4, MiB, MiB + 65536, 4 * MiB + 4, 12 * MiB, 12 * MiB + 4):
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    y = torch.randint(0, 255, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + 1))
    d = x.to(dev)  # a whole new tensor
    hy = other.upload(y)
    pair = torch.zeros(2, n, dtype=torch.uint8, device=dev)
    pair[1].copy_(x)  # into a slice: a temporary handle and copy_
    out["sizes"][n] = [torch.equal(d.cpu(), x), torch.equal(pair[1].cpu(), x), not pair[0].cpu().any().item(),
                       torch.equal(other.download(hy), y)]
    other.free([hy])
    del d, pair
torch.gpupool.synchronize()
other.close()
print(json.dumps(out))
""".replace("MiB", str(MiB))


def test_uploads_from_1_mib_go_on_the_side_socket(tmp_path: Path) -> None:
    """Round 52: outside a recorded step an upload of 1 MiB (bulk.MIN_UPLOAD) or more goes through Session.upload
    (the side socket's bulk bytes, straight from the tensor's memory), not into the frame (two copies of its bytes on
    the client, fresh pages, one more in the daemon), so a daemon whose frames hold little more than 1 MiB
    (`--max-message-size`) takes them; until round 52 one of 1-12 MiB went into the frame, over that limit: the session
    ended. Sizes at and around 1, 4 and 12 MiB, whole and into a slice, come back bit for bit, and a neighbour session's
    uploads of the same sizes in between stay its own."""
    d = start_daemon(tmp_path, "1GiB", 1, "--bulk-listen", "127.0.0.1:0", "--max-message-size", str(MiB + 4096))
    try:
        env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-c", THRESHOLD_CHILD, d.address, d.token(lease_id="a"), d.token(lease_id="b")]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=280)
    finally:
        stop_process(d.process)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["bulk"]
    assert len(got["sizes"]) == 6 and all(v == [True] * 4 for v in got["sizes"].values()), got["sizes"]
