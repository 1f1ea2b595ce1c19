"""Mutated real frames against a live daemon (records_fuzz.py): compact eager records, graph definitions and runs,
uploads, on the stream and on the side socket. A fixed seed and a bounded number of cases here (about 30 s);
`GPUPOOL_RECORDS_FUZZ_CASES=5000 GPUPOOL_RECORDS_FUZZ_SEED=<n>` for a long hunt."""

from __future__ import annotations

import os
import random
import resource
import secrets
import threading
import time
from pathlib import Path

import pytest
import records_fuzz as rf
from gpupool.client.session import Session
from support import DaemonHandle, Healthy, MiB, start_serve_process, stop_process, tls_channel, wait_only_tenants

from gpupool._proto import device_pb2, device_pb2_grpc

GiB = 1024**3
QUOTA = 64 * MiB
CASES = int(os.environ.get("GPUPOOL_RECORDS_FUZZ_CASES", "40"))
SEED = int(os.environ.get("GPUPOOL_RECORDS_FUZZ_SEED", "32"))
ISOLATION = os.environ.get("GPUPOOL_RECORDS_FUZZ_ISOLATION", "process")


@pytest.mark.slow
def test_mutated_recorded_frames_harm_nothing(tmp_path: Path) -> None:
    key = secrets.token_hex(32).encode()
    key_file = tmp_path / "token.key"
    key_file.write_bytes(key + b"\n")
    proc, address = start_serve_process(
        key_file, "--fake-gpus", "1", "--fake-gpu-memory", "8GiB", "--bulk-listen", "127.0.0.1:0",
        "--isolation", ISOLATION,
        "--tls-client-auth", "require",  # the test's (admin) certificate sees every session: wait_only_tenants
    )  # fmt: skip
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (8 * GiB, 8 * GiB))
    daemon = DaemonHandle(address, key, "test-host", process=proc)
    number, recording = rf.recorded(address, daemon.token(quota_bytes=QUOTA), tmp_path)
    commands = [[c for c in device_pb2.ClientFrame.FromString(f).commands] for f in recording]
    assert any(c.WhichOneof("cmd") == "eager_op" for f in commands for c in f)
    assert any(c.WhichOneof("cmd") == "run_graph" for f in commands for c in f)
    holder = Session.attach(address, daemon.token(tenant="holder", quota_bytes=QUOTA))
    canary, pattern = rf.canary_tensor(SEED)
    kept = holder.upload(canary)
    holder.sync([])
    stop = threading.Event()

    def churn() -> None:  # the holder writes and frees canary bytes all along: freed memory a neighbour must not see
        while not stop.wait(0.02):
            holder.free([holder.upload(canary)])
            holder.sync([])

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    neighbour = Healthy(address, daemon.token(tenant="neighbour", quota_bytes=QUOTA), pause=0.05)
    channel = tls_channel(address, options=[("grpc.max_receive_message_length", 256 * MiB)])
    rng = random.Random(SEED)
    problems: list[str] = []
    counts: dict[str, int] = {}
    start = time.monotonic()
    try:

        def plain(base: int) -> tuple[rf.Case, list[bytes]]:
            case = rf.Case([rf.relocate(f, number, base >> 32) for f in recording])
            return case, [rf.join(c) for c in case.frames]

        case, out = rf.run_case(channel, daemon.token(quota_bytes=QUOTA), address, plain, 60)
        assert out.finished and not out.codes, (out.codes, out.messages)  # the recording replays cleanly

        for i in range(CASES):

            def build(base: int) -> tuple[rf.Case, list[bytes]]:
                mutator = rf.Mutator(rng, base, holder.handle_base)
                case = mutator.case([rf.relocate(f, number, base >> 32) for f in recording])
                return case, [rf.join(c) for c in case.frames]

            case, out = rf.run_case(channel, daemon.token(quota_bytes=QUOTA), address, build, 30)
            if i % 100 == 99:
                print(f"{i + 1} cases, {time.monotonic() - start:.0f} s", flush=True)
            for code in out.codes:
                counts[code] = counts.get(code, 0) + 1
            bad = rf.check(out, pattern)
            if proc.poll() is not None:
                bad.append(f"the daemon died (exit {proc.returncode})")
            if bad:
                problems.append(f"case {i} ({case.carrier}; {'; '.join(case.did)}): {bad} {out.messages[:3]}")
                print("FOUND", problems[-1], flush=True)
                if proc.poll() is not None:
                    break
        print(f"{CASES} cases in {time.monotonic() - start:.0f} s; codes: {counts}")
        assert not problems, "\n".join(problems[:20])
        stop.set()
        churner.join(30)
        assert not churner.is_alive()
        assert holder.download(kept).equal(canary)
        neighbour.check()
        wait_only_tenants(device_pb2_grpc.DeviceStub(channel), {"holder", "neighbour"})
    finally:
        stop.set()
        neighbour.close()
        holder.close()
        channel.close()
        assert stop_process(proc) == 0
