"""The daemon's front per frame, alone: a recorded eager stream replayed through the stream reader with a null worker.

A launch_bound workload trains eagerly through a real daemon while every frame its client sends is saved
(`eager_replay.py --dump`, the same recording). Then, in one process, the frames go through the daemon's own stream
reader (`DeviceServicer._read`: checking the frame, splitting it into commands, the fair queue, the slice, the
hand-off to the session's runner, mirroring the result) exactly as a gRPC stream would hand them over, but the
session's runner is a null worker: it does the daemon's side of a real worker's hand-off (the slice's spans copied
into a shared buffer, the request's header, the result decoded) and nothing else (no process, no socket, no
kernel runs). What is left is the front's own Python per frame; gRPC's, the worker's and the wake-ups are not in
it (bench/daemon_wire.py measures the round trip whole). Each frame runs while the device is idle, so the reader
runs its slices itself (`Daemon.submit`), as it does for a session alone on its device.

`--measure instr` counts instructions (callgrind, on around the timed replay only): exact on a loaded box.
`--against DIR` replays the same recording through another checkout's front too (run by --against-python).
`--items N` replays N `.item()`s instead (what `loss.item()` sends: a Sync of one scalar handle, which the null
worker answers with a SyncReply of one float, each reply taken off the outbox as the stream's writer takes it).

    python bench/front_replay.py [--models tiny-mlp,encoder] [--repeats 20]
    python bench/front_replay.py --measure instr --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
    python bench/front_replay.py --items 2000 --measure instr --against DIR --against-python DIR/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cgtools

HERE = Path(__file__).resolve().parent


class NullRunner:
    """A session's runner that runs nothing: the daemon's side of `worker.ProcessRunner.run` (the spans joined into
    the shared buffer, the request header, the result decoded and checked) against a worker that has already
    answered "all of them ran"."""

    pid = 1  # not 0: the reader runs the slice itself, as for a worker process

    def __init__(self, reply: bytes = b"") -> None:
        from gpupool.server import slices, worker

        self._slices = slices
        self._reply = [reply] if reply else []  # each slice answers this frame (an `.item()`'s SyncReply)
        self._data = memoryview(bytearray(worker.DATA_BYTES))
        self._results: dict[int, bytes] = {}
        self.commands = 0  # commands it was handed: the replay checks that every frame went through

    def _result(self, commands: int) -> bytes:
        got = self._results.get(commands)
        if got is None:
            buf = memoryview(bytearray(4096))
            n = self._slices.write_result(
                self._slices.SliceResult(executed=commands, seconds=1e-6, replies=self._reply), buf
            )
            got = self._results[commands] = bytes(buf[:n])
        return got

    def run(self, req: Any, commands: int, parts: Any = ()) -> Any:
        self.commands += commands
        # the spans' bytes as `worker.ProcessRunner.run` takes them: the daemon's count (`req.size`), or none (-1:
        # counted here; -2, `worker.SMALL` since round 48: the join counts them). Until round 48 this counted them
        # again whatever the daemon had counted, which the real runner never did (~2-8k instructions a frame)
        size = req.size
        if size == -1:
            size = sum(map(len, parts))
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        if size < 0:
            size = len(joined)
        self._data[:size] = joined
        self._slices.shared_request(req, size)
        return self._slices.decode_result(self._result(commands), commands, None)

    def alive(self, timeout: float = 1.0) -> bool:
        return True

    def idle(self) -> bool:
        return True

    def progress(self) -> int:
        return 0

    def contend(self, contended: bool) -> None:  # the fair queue's word to a worker (a byte of shared memory)
        pass

    def close(self) -> None:
        pass


def replay(path: str, repeats: int, instr: bool) -> dict[str, Any]:
    """Frames of the recording's timed steps through the front, `repeats` times; CPU (or instructions) per frame."""
    from gpupool.server import slices
    from gpupool.server.daemon import Daemon, DaemonConfig
    from gpupool.server.front import FrontSession
    from gpupool.server.service import DeviceServicer

    from gpupool.tokens import TokenClaims

    d = json.loads(Path(path).read_text())
    frames = [bytes.fromhex(f) for f in d["frames"][d["start"] : d["end"]]]
    daemon = Daemon(DaemonConfig(fake_gpus=1, host_id="bench", metrics_listen=""))  # not started: no threads
    servicer = DeviceServicer(daemon)
    dev = daemon.device_list[0]
    times: list[float] = []
    total = sum(len(slices.split_frame(f, 1 << 20)) for f in frames)
    for r in range(repeats + 1):
        claims = TokenClaims(f"bench-{r}", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
        s = FrontSession(f"s{r}", r + 1, claims, dev, 1 << 30, "bench")
        s.runner = NullRunner(bytes.fromhex(d.get("reply", "")))  # type: ignore[assignment]
        s.entry = daemon.queues[dev.index].add(s, 1.0)
        counting = instr and r == repeats
        if counting:
            cgtools.control("--instr=on")
        start = time.thread_time()
        out: list[Any] = []
        servicer._read(s, _writer(daemon, s, frames, out))
        list(_writer(daemon, s, [], out))  # the last replies
        took = time.thread_time() - start
        if counting:
            cgtools.control("--dump=front", "--instr=off")
        ran = s.runner.commands  # type: ignore[union-attr]
        if ran != total:  # the reader stopped early: what it queued for the stream says why
            raise SystemExit(f"the front ran {ran} of the frames' {total} commands: {out[:1]!r}")
        if r:  # the first one warms every cache
            times.append(took / len(frames))
        daemon.queues[dev.index].remove(s.entry)
    ops = d["ops"]
    return {"frames": len(frames), "ops_per_frame": ops / len(frames), "cpu": min(times),
            "median": statistics.median(times)}  # fmt: skip


def _item_recording(n: int) -> dict[str, Any]:
    """A recording of `n` `.item()`s: what `loss.item()` sends (a Sync of one scalar handle, its own request id)
    and the worker's answer (a SyncReply with one float), as the null worker answers each."""
    from gpupool._proto import device_pb2

    frames = []
    for i in range(n):
        frame = device_pb2.ClientFrame()
        frame.commands.add().sync.MergeFrom(device_pb2.Sync(request_id=i + 1, scalar_handles=[(1 << 32) + 7]))
        frames.append(frame.SerializeToString().hex())
    reply = device_pb2.ServerFrame(request_id=n)
    reply.sync.values.add(f=0.6931)
    return {"frames": frames, "start": 0, "end": n, "ops": n, "reply": reply.SerializeToString().hex()}


def _writer(daemon: Any, s: Any, frames: list[bytes], out: list[Any]) -> Iterator[bytes]:
    """The frames for the reader, one by one; before each (and at the end) the replies queued so far are taken
    as the stream's writer takes them (`DeviceServicer._replies`: `Daemon.replied` for each) into `out`."""
    from gpupool.server.daemon import END_OF_STREAM

    for f in [*frames, None]:
        while not s.outbox.empty():
            out.append(s.outbox.get_nowait())
            if out[-1] is not END_OF_STREAM:
                daemon.replied(s, out[-1])
        if f is not None:
            yield f


def _instructions(python: str, where: Path, path: str, tmp: str) -> dict[str, Any]:
    out_file = Path(tmp) / "front.out"
    for old in Path(tmp).glob("front.out*"):
        old.unlink()
    exe = subprocess.check_output([python, "-c", "import sys; print(sys.executable)"], text=True).strip()
    cmd = [*cgtools.valgrind(out_file), exe, str(HERE / "front_replay.py"), "--replay", path, "--repeats", "1",
           "--instr"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=where)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    dumps = [p for p in Path(tmp).glob("front.out.*") if "front" in p.read_text().split("desc: Trigger:", 1)[1][:200]]
    text = dumps[0].read_text()
    totals = [line for line in text.splitlines() if line.startswith(("totals:", "summary:"))]
    return {**r, "instr": int(totals[-1].split()[1]) / r["frames"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mlp", help="comma-separated launch_bound workloads")
    p.add_argument("--steps", type=int, default=20, help="recorded steps")
    p.add_argument("--repeats", type=int, default=20, help="replays per process (the min counts)")
    p.add_argument("--rounds", type=int, default=3, help="replay processes per checkout, alternating")
    cgtools.add_against_flags(p, "another checkout's front replaying the same recording")
    p.add_argument("--recording", metavar="FILE", help="replay this recording (eager_replay.py --dump) for every model")
    p.add_argument(
        "--items",
        type=int,
        metavar="N",
        help="replay N `.item()` frames (a Sync of one scalar, each answered with its value) instead of a model",
    )
    p.add_argument("--replay", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--instr", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.replay:
        print(json.dumps(replay(args.replay, args.repeats, args.instr)))
        return 0
    if args.measure == "instr" and shutil.which("valgrind") is None:
        p.error("--measure instr needs valgrind (apt-get install valgrind)")
    # the other checkout runs this file too (its gpupool, this tree's replay code): only the front is compared
    trees = {"this": sys.executable}
    if args.against:
        trees["other"] = args.against_python
    where = {"this": HERE, "other": Path(args.against or HERE) / "bench"}
    with tempfile.TemporaryDirectory() as tmp:
        for model in [".item()"] if args.items else args.models.split(","):
            path = args.recording or str(Path(tmp) / f"{model}.json")
            if args.items:
                Path(path).write_text(json.dumps(_item_recording(args.items)))
            elif not args.recording:
                cmd = [sys.executable, str(HERE / "eager_replay.py"), "--dump", model, path, "--steps", str(args.steps)]
                subprocess.run(cmd, check=True, capture_output=True, cwd=HERE)
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
            instr = args.measure == "instr"
            for i in range(1 if instr else args.rounds):
                for name in trees if i % 2 == 0 else reversed(list(trees)):
                    if instr:
                        runs[name].append(_instructions(trees[name], where[name], path, tmp))
                        continue
                    script = str(HERE / "front_replay.py")
                    argv2 = [trees[name], script, "--replay", path, "--repeats", str(args.repeats)]
                    out = subprocess.run(argv2, check=True, capture_output=True, text=True, cwd=where[name])
                    runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            key = "instr" if instr else "cpu"
            best = {k: min(v, key=lambda r: r[key]) for k, v in runs.items()}
            for name, r in best.items():
                figure = f"{r['instr'] / 1e3:.0f} k instructions" if instr else f"{r['cpu'] * 1e6:.1f} us CPU"
                print(f"{model} ({name}): {r['frames']} frames of {r['ops_per_frame']:.1f} ops: {figure} per frame")
            if args.against:
                print(f"{model}: this front / the other's per frame: {best['this'][key] / best['other'][key]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
