"""A short, deterministic slice of scripts/fuzz_native.py (the fuzz of the C++ paths that read a client's bytes,
native_runner.cpp), in-process: its `parsers` mode (the frame readers `eager_frame`, `eager_records` and
`split_frame` against upb's parse and the Python reading; `free` against `WorkerSession.free` on an identical
session, on structure-aware and damaged Free messages; an upload split at every byte) and its `runs` mode (a
recorded training stream whose uploads and frees among the records are damaged, split into chunks, or inserted, run
by the native runner, the Python path and every command on its own: the three agree on everything a client can
observe). Under AddressSanitizer and UBSan through scripts/fuzz_native.sh (longer runs, other seeds) or
scripts/runner_asan.sh (this file among the others).

Pins behaviour that holds on the base for its fixed seed (the campaign's one finding, a zero-element upload shape
refused in different words with the runner on and off, has its own test in test_server_native_upload.py: BENCHMARKS.md
"Round 41, fuzz41"); it fails where a reader accepts bytes its reference reads otherwise, or the runner's uploads and
frees among a run's records leave a session in another state than the plain path."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import fuzz_native  # noqa: E402

sys.path.remove(str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("GPUPOOL_RUNNER_FUZZ_RECORDINGS")  # (scripts/runner_asan.sh's folder of recordings)
    if given:
        return Path(given) / "tiny-mlp.json"
    out = tmp_path_factory.mktemp("recording") / "tiny-mlp.json"
    cmd = [sys.executable, str(ROOT / "bench" / "eager_replay.py"), "--dump", "tiny-mlp", str(out), "--steps", "4"]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300)
    return out


def _args(seed: int, inputs: int, recording: Path) -> argparse.Namespace:
    return argparse.Namespace(seed=seed, seconds=1e9, inputs=inputs, skip=0, recording=[str(recording)], daemon_flag=[])


def test_parsers_agree_with_their_references(native_runner_module: Any, recording: Path) -> None:
    counts = fuzz_native.parsers(_args(41, 2000, recording), native_runner_module)
    print(dict(counts))
    assert counts["inputs"] == 2000
    # the slice reached each reader's accepting and refusing sides
    assert counts["frame:parsed"] > 200 and counts["frame:refused"] > 200, counts
    assert counts["free:freed"] > 30 and counts["free:error"] > 30 and counts["free:left"] > 10, counts
    assert counts["upload splits"] > 100, counts  # an upload split at every byte (and pairs of bytes), N and P alike
    # (secrev51) uploads and frees outside a run compared on sessions at their quota's, device's and handle limit's
    # edges, with pinned handles and an upload pool holding memory
    assert counts["between:compared at the edges"] > 20, counts


def test_damaged_uploads_and_frees_among_records_run_alike(native_runner_module: Any, recording: Path) -> None:
    counts = fuzz_native.runs(_args(41, 10, recording), native_runner_module)
    print(dict(counts))
    assert counts["frames"] >= 10 and counts["native records"] > 0, counts
    # uploads and frees ran inside the runner's runs (`Ctx::between`), and some frames met errors
    assert counts["between in native runs"] > 0 and counts["slices with errors"] > 0, counts


def test_run_graph_frames_run_alike_from_their_bytes_and_parsed(native_runner_module: Any) -> None:
    """Round 44 (hostile44): `graphs` mode, seeded RunGraph frames (`fuzz_native.GraphGen`: damaged fields and bytes,
    overlong lengths, other graphs' and sessions' ids and handles, a DropGraph among runs, frames of 64 KiB - 1, 64
    KiB and 64 KiB + 1 bytes) run by twin sessions of one traced graph, one whose quiet runs read a lone frame's
    bytes in C++ (`graph_frame`, `GraphPlan.run_raw`), one that parses it: the same results,
    errors and state. Pins behaviour that holds on b647913 (the campaign found no difference). Round 44 (fuzzrev44):
    on the merged tree (7d92e94) it failed at its first input (the spy on `GraphTable.run_raw` took no `graph_id`,
    slice44's); frames of 2-5 RunGraphs mixing runs, declined and damaged ones ("mixed") added. Round 45 (hostile45):
    the twins' graph drawn from `fuzz_native._shapes` (views as outputs, in-place and out= ops on persistent
    tensors, tensor lists in and out, several outputs, int64 and bool inputs, a second input by value, a write
    into a persistent handle, two persistent tensors of one storage) rather than round 44's one graph."""
    counts = fuzz_native.graphs(_args(44, 300, Path("unused")), native_runner_module)
    print(dict(counts))
    assert counts["inputs"] == 300
    # the C++ reading ran frames and declined others, and every kind of frame ran, failed and was refused
    assert counts["raw runs"] > 100 and counts["raw declined"] > 50, counts
    assert counts["lone:ran"] > 10 and counts["lone:error"] > 10 and counts["lone:refused"] > 10, counts
    assert counts["drop:ran"] > 5 and counts["drop:error"] > 5 and counts["64k:ran"] > 5, counts
    # (fuzzrev44) frames of 2-5 RunGraphs mixing runs, ones the plan declines and damaged ones
    assert counts["mixed:ran"] > 0 and counts["mixed:error"] > 5 and counts["mixed:refused"] > 0, counts
    # (hostile45) every graph shape drawn, each for at least a few frames
    shapes = {k: v for k, v in counts.items() if k.startswith("shape:")}
    assert len(shapes) == len(fuzz_native._shapes()) and min(shapes.values()) >= 5, counts
    # (secrev51) a second graph's runs among the first's: each graph's plan kept its inputs at times, never both
    assert all(counts[f"second graph:{k}"] > 0 for k in range(4)), counts
    assert counts["inputs kept by graph 1"] > 10 and counts["inputs kept by graph 2"] > 0, counts


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_run_graph_frames_on_the_side_socket_and_the_stream_harm_no_neighbour(isolation: str) -> None:
    """Round 44 (hostile44): `graph-daemon` mode, `GraphGen`'s frames through a live `gpupool serve --bulk-listen`
    from hostile sessions on their side sockets and streams, their graphs quiet and traced (lone frames of 64 KiB - 1
    to 64 KiB + 1 bytes among them): every error actionable, only malformed frames end a session, a session that goes
    on computes right, a neighbour's matmuls and its own graph of the same id right throughout, the daemon SERVING
    and exiting 0. Pins behaviour that holds on b647913. Round 45 (hostile45): each hostile session's graph drawn
    from `fuzz_native._shapes` (its outputs and kept tensors checked bit for bit against `GraphShape.ref`), the
    first one round 44's at ~64 KiB."""
    args = _args(44, 120, Path("unused"))
    args.daemon_flag = ["--isolation", isolation]
    counts = fuzz_native.graph_daemon(args, None)
    print(dict(counts))
    assert counts["frames"] >= 120, counts
    assert counts["sessions on the side socket"] > 0 and counts["sessions on the stream"] > 0, counts
    assert counts["sent:64k lone"] > 0 and counts["fuzzed graph right after"] > 0 and counts["sessions ended"] > 0
    assert counts["sent:mixed"] > 0, counts  # (fuzzrev44) frames of 2-5 RunGraphs: runs, declined, damaged
    assert sum(k.startswith("shape:") for k in counts) >= 4, counts  # (hostile45) graphs of several shapes
    assert counts["code:NOT_FOUND"] > 0 and counts["code:INVALID_ARGUMENT"] > 0, counts


def test_the_fused_attentions_cpp_compositions_decline_or_match_the_python_runs(native_runner_module: Any) -> None:
    """Round 46 (hostile46): `attention` mode, enc45's C++ compositions of the fused attention with dropout
    (native_runner.cpp `attn::run`'s forward and backward) on hostile calls -- mixed and other dtypes, zero sizes,
    shapes the validators refuse, query, key, value, grad_out and out as expanded, overlapping, transposed and offset
    views of one storage, biases that do and do not broadcast, dropout and scale out of range, backward seeds that
    are forged bytes of the right size, the state alone, off by 8 bytes, at an offset, of another dtype or dim, or
    the query's own storage -- against the Python runs they stand in for: each declined (nothing drawn) or the same
    values bit for bit, the same kept storage and generator state; never one the Python run refuses. Pins behaviour
    that holds on the base (67a03c05; the campaign found no difference, under ASan and UBSan too: BENCHMARKS.md
    "Round 46, hostile46")."""
    counts = fuzz_native.attention_fuzz(_args(46, 400, Path("unused")), native_runner_module)
    print(dict(counts))
    assert counts["inputs"] == 400
    # both sides of each call: run in C++, declined to the Python run that runs it, declined where it refuses
    assert counts["forward:ran"] > 40 and counts["forward:declined"] > 5, counts
    assert counts["forward:declined, refused"] > 100, counts
    for seed in ("forward", "forged", "inputs"):  # backward seeds C++ may run from: run at least once each
        assert counts[f"backward {seed}:ran"] > 0, counts
    for seed in ("state", "short", "long", "offset", "float", "1-d"):  # never run in C++
        assert counts[f"backward {seed}:ran"] == 0 and counts[f"backward {seed}:declined, refused"] > 0, counts
