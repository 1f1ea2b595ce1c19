"""gpupool.protocol: the op stream's constants and hand-built frames agree with protobuf's own encoding."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from gpupool import protocol
from gpupool._proto import device_pb2


def test_hand_built_frames_parse_as_protobuf() -> None:
    up = device_pb2.Upload(handle=5, offset=8, last=True)
    frame = device_pb2.ClientFrame.FromString(protocol.upload_frame(up, memoryview(b"abc" * 100)))
    (cmd,) = frame.commands
    assert cmd.WhichOneof("cmd") == "upload" and cmd.upload.handle == 5 and cmd.upload.offset == 8
    assert cmd.upload.data == b"abc" * 100 and cmd.upload.last
    head = device_pb2.ServerFrame(request_id=7).SerializeToString()
    chunk = device_pb2.TensorChunk(offset=4)
    reply = device_pb2.ServerFrame.FromString(protocol.chunk_frame(head, chunk, b"xyz" * 50))
    assert reply.request_id == 7 and reply.chunk.offset == 4 and reply.chunk.data == b"xyz" * 50


def test_command_kinds_are_the_first_tag_of_a_command() -> None:
    kinds = {"op": protocol.OP, "upload": protocol.UPLOAD, "get": protocol.GET, "sync": protocol.SYNC}
    for name, kind in kinds.items():
        raw = device_pb2.Command(**{name: getattr(device_pb2, name.capitalize())()}).SerializeToString()
        assert raw[0] >> 3 == kind
    frame = device_pb2.ClientFrame(commands=[device_pb2.Command(free=device_pb2.Free())]).SerializeToString()
    assert frame[:1] == protocol.FRAME_COMMANDS_TAG


def test_enums_travel_as_their_strings() -> None:
    assert protocol.Policy("spread") is protocol.Policy.SPREAD and protocol.HostState.DOWN == "down"
    lease = device_pb2.DeviceInfo(model=protocol.LeaseState.LOST)  # a proto string field takes a member as is
    assert lease.model == "lost"


def test_the_scheduler_and_leasing_load_no_torch() -> None:
    code = "import sys, gpupool.protocol, gpupool.scheduler.cli, gpupool.client.pool; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# `gpupool serve` as far as its config, with the zygote's start recorded (and not done): was torch loaded by then?
SERVE_START = """
import sys
import gpupool.server.zygote as zygote
seen = []
zygote.shared_zygote = lambda: seen.append("torch" in sys.modules)
from gpupool.server import cli
print(cli.main(["--token-public-keys", sys.argv[1], *sys.argv[2:]]), seen, "torch" in sys.modules)
"""


def test_gpupool_serve_starts_its_zygote_before_it_imports_torch(tmp_path: Path) -> None:
    """The zygote imports torch (~4-8 s) while the daemon's process imports it too, not after: one of the two imports
    off `gpupool serve`'s start (the daemon's module imports, server/daemon.py and speedmodel.py, load torch)."""
    missing = str(tmp_path / "no-such-key.pub")  # a config error: main returns 2 after the zygote's start
    argv = [missing, "--metrics-listen", "0"]  # (metrics over TLS without --tls-ca: refused before the zygote)
    out = subprocess.run([sys.executable, "-c", SERVE_START, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "[False]", "True"], out.stdout + out.stderr[-2000:]


def test_gpupool_serve_refuses_metrics_without_a_ca_before_its_slow_start(tmp_path: Path) -> None:
    """The README's hand-minted-token daemon (`--tls-cert`, `--tls-key`, no `--tls-ca`, metrics on by default) cannot
    serve its metrics over TLS: serve says so, one line, before the zygote starts and before torch is imported. Until
    round 47 it said it ~40 s later on a loaded box ("cannot start: metrics over TLS need --tls-ca"), after both."""
    missing = str(tmp_path / "no-such-key.pub")
    argv = [missing, "--tls-cert", str(tmp_path / "host.crt"), "--tls-key", str(tmp_path / "host.key")]
    env = {k: v for k, v in os.environ.items() if k != "GPUPOOL_TLS_CA"}  # (the session's test PKI sets one)
    cmd = [sys.executable, "-c", SERVE_START, *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "[]", "False"], out.stdout + out.stderr[-2000:]
    assert "cannot start: metrics over TLS need --tls-ca" in out.stderr, out.stderr[-2000:]
    assert "--metrics-listen 0 turns them off" in out.stderr


ZYGOTE_LAUNCH = """
import sys
from gpupool.server.zygote import Zygote
z = Zygote()
z.start()
z.wait_ready()
print("torch" in sys.modules)
env = open(f"/proc/{z._proc.pid}/environ", "rb").read().split(bytes(1))
print(b"PYTORCH_NVML_BASED_CUDA_CHECK=1" in env)
z.stop()
"""


def test_a_zygote_starts_without_torch_in_the_daemons_process() -> None:
    """The zygote's start itself (`_launch`, the runner source's digest it is told included) imports no torch in the
    daemon's process: else `gpupool serve`'s two torch imports run one after the other again (the test above stubs
    the start, so it cannot see this). And the zygote asks NVML, not the CUDA runtime, whether there is a GPU: a
    CUDA runtime call before a fork poisons every worker it forks (server/zygote.py `_launch`)."""
    out = subprocess.run([sys.executable, "-c", ZYGOTE_LAUNCH], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr[-2000:]


ZYGOTE_THREADS = """
import os, logging
from gpupool.server.worker import WorkerSpec
from gpupool.server.zygote import Zygote
logging.basicConfig(level=logging.ERROR)
z = Zygote()
z.start()
z.wait_ready()
pid = z._proc.pid
print(len(os.listdir(f"/proc/{pid}/task")))
device = {"index": 0, "uuid": "fake-0", "model": "fake", "memory_bytes": 1 << 30, "fake": True}
runner = z.spawn(WorkerSpec("s-threads", 1, device, 1 << 28, 1000, 0, 0, 1, "", False), max_reply=1 << 20)
print(os.path.exists(f"/proc/{runner.pid}"), len(os.listdir(f"/proc/{pid}/task")))
runner.close()
z.stop()
"""


def test_the_zygote_is_single_threaded_when_it_forks() -> None:
    """A thread that holds a lock at a fork leaves it held in the child (a worker that deadlocks). torch's import
    starts OpenBLAS's thread pool (numpy's copy); the zygote stops it once warm, as OpenBLAS's own fork handler does
    (server/zygote.py `_stop_blas_threads`): one thread when it is ready, and still one after forking a worker. Before
    round 30 it had two until its first fork. Nothing is logged: the zygote names no other thread to the daemon."""
    out = subprocess.run([sys.executable, "-c", ZYGOTE_THREADS], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "True", "1"], out.stdout + out.stderr[-2000:]
    assert "other threads" not in out.stderr, out.stderr[-2000:]


def test_the_zygote_names_threads_besides_its_own() -> None:
    from gpupool.server import zygote

    assert threading.get_native_id() not in [int(t.split()[0]) for t in zygote._other_threads()]
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="gp-test-thread")
    other.start()
    try:
        assert str(other.native_id) in [t.split()[0] for t in zygote._other_threads()]  # (the kernel's name for it)
    finally:
        stop.set()
        other.join()


def test_a_lone_sync_is_recognized_by_its_exact_bytes() -> None:
    """The daemon's fast round trip reads a lone Sync without protobuf: only the exact bytes protobuf writes for
    one Sync with a request id and nothing else qualify, and its reply is byte for byte protobuf's."""
    for rid in (0, 1, 127, 128, 300, 2**32, 2**63, 2**64 - 1):
        raw = device_pb2.ClientFrame(
            commands=[device_pb2.Command(sync=device_pb2.Sync(request_id=rid))]
        ).SerializeToString()
        assert protocol.sync_frame(rid) == raw and protocol.lone_sync(raw) == rid
        reply = device_pb2.ServerFrame(request_id=rid, sync=device_pb2.SyncReply()).SerializeToString()
        assert protocol.sync_reply(rid) == reply
    scalars = device_pb2.Sync(request_id=5, scalar_handles=[3])
    two = [device_pb2.Command(sync=device_pb2.Sync(request_id=5))] * 2
    others = [
        device_pb2.ClientFrame(commands=[device_pb2.Command(sync=scalars)]).SerializeToString(),  # scalars to read
        device_pb2.ClientFrame(commands=two).SerializeToString(),  # two commands
        device_pb2.ClientFrame(commands=[device_pb2.Command(get=device_pb2.Get(request_id=5))]).SerializeToString(),
        b"\x0a\x05\x32\x03\x08\x81\x00",  # request id 1 in a non-canonical varint: protobuf decides
        b"\x0a\x04\x32\x02\x08\x80",  # truncated varint
        b"\x0a\x04\x32\x02\x10\x01",  # another field of Sync
        b"\x0a\x02\x32\x00\x00",  # trailing byte
        b"",
        b"\x0a",
    ]
    for raw in others:
        assert protocol.lone_sync(raw) is None, raw
