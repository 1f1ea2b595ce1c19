"""A structured fuzz of the native runner (server/native_runner.cpp) against real training streams, in-process.

The frames a real client sent for two workloads (launch_bound's tiny MLP and small encoder, Adam, recorded through
a live daemon by `bench/eager_replay.py --dump`) are replayed into three executors with identical sessions:
N runs learned runs with the native runner, P the same learned runs with the runner off (the Python path), and R
every command on its own (no `eager_span`, no learned run: the reference). The warm-up steps are replayed as
recorded (the runs are learned from them); every later frame gets seeded damage: bit flips, records cut or
lengthened, handle fields swapped to a neighbour session's live handle, the reserved base, 0, a never-made handle,
a freed one, a handle of the step not made yet, or (most often) another live one; a view argument's sizes,
strides or offset set to edge values; numbers set to NaN, inf, huge or negative; records dropped, duplicated or
swapped; now and then a new seed between records (the encoder's dropout draws inside learned runs: the runner
must see the session's stream start again). Every other case runs under a quota just above what the clean stream
holds. After every
slice (drifting cuts) the three must agree on everything a client can observe: the slice's result, the pending
error (code, op, message), the poisoned handles, every live tensor's meta and bytes, and the accounting; a
neighbour session's tensor in the same executor stays bit-exact. The native runner must have run records.

Run under AddressSanitizer and UBSan with scripts/runner_asan.sh (docs/operations.md "The native runner under
sanitizers"). Budget: GPUPOOL_RUNNER_FUZZ_CASES cases per workload, a test each (default 3: ~50 s with the recording);
GPUPOOL_RUNNER_FUZZ_SEED moves the seeds; GPUPOOL_RUNNER_FUZZ_RECORDINGS names a folder holding
`tiny-mlp.json` and `encoder.json` from `bench/eager_replay.py --dump` (else they are recorded here, ~15 s each).
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from gpupool.server import native_runner, slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession

from gpupool import compact
from gpupool._proto import device_pb2

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("tiny-mlp", "encoder")
CASES = int(os.environ.get("GPUPOOL_RUNNER_FUZZ_CASES", "3"))
SEED = int(os.environ.get("GPUPOOL_RUNNER_FUZZ_SEED", "0"))
QUOTA = 1 << 26
RATE = 0.05  # of a damaged frame's records, damaged (at least one)
SEEDS = 0.2  # of the damaged frames, those that get a seed command too
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("GPUPOOL_RUNNER_FUZZ_RECORDINGS")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("recordings")
    procs = []
    for model in MODELS:  # the models' recordings are made side by side
        cmd = [sys.executable, str(ROOT / "bench" / "eager_replay.py"), "--dump", model, str(out / f"{model}.json"),
               "--steps", "4"]  # fmt: skip
        procs.append((cmd, subprocess.Popen(cmd, cwd=ROOT)))
    try:
        for cmd, proc in procs:
            assert proc.wait(timeout=300) == 0, f"{cmd} exited with {proc.returncode}"
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


# ---- where a record's fields are (compact.py's layout), for damage that keeps the record parseable ----


class Fields:
    """Byte offsets of a record's handle fields, view geometry fields and number fields (as far as it parses)."""

    def __init__(self, data: bytes) -> None:
        self.handles: list[int] = []
        self.geometry: list[int] = []
        self.numbers: list[tuple[int, str]] = []  # (offset, "q" or "d")
        try:
            self._walk(data)
        except (IndexError, struct.error, KeyError):
            pass

    def _walk(self, data: bytes) -> None:
        pos = 5 + data[4]
        n_out = data[pos]
        self.handles += [pos + 1 + 8 * j for j in range(n_out)]
        pos += 1 + 8 * n_out
        n = data[pos]
        pos += 1
        for _ in range(n):
            pos = self._arg(data, pos)
        n = data[pos]
        pos += 1
        for _ in range(n):
            pos = self._arg(data, pos + 1 + data[pos])

    def _arg(self, data: bytes, pos: int) -> int:
        tag = data[pos]
        pos += 1
        if tag == compact.TENSOR:
            self.handles.append(pos)
            return pos + 8
        if tag == compact.VIEW:
            self.handles.append(pos)
            rank = data[pos + 8]
            self.geometry += [pos + 9 + 8 * j for j in range(2 * rank + 1)]
            return pos + 9 + 8 * (2 * rank + 1)
        if tag in (compact.INT, compact.FLOAT):
            self.numbers.append((pos, "q" if tag == compact.INT else "d"))
            return pos + 8
        if tag in (compact.NONE, compact.DEVICE, compact.CPU):
            return pos
        if tag in (compact.BOOL, compact.DTYPE, compact.LAYOUT, compact.MEMORY_FORMAT):
            return pos + 1
        (count,) = struct.unpack_from("<H", data, pos)
        pos += 2
        if tag == compact.TENSORS:
            self.handles += [pos + 8 * j for j in range(count)]
        elif tag in (compact.INTS, compact.FLOATS):
            self.numbers += [(pos + 8 * j, "q" if tag == compact.INTS else "d") for j in range(count)]
        return pos + (count if tag == compact.BOOLS else 8 * count)


GEOMETRY_EDGES = (0, 1, -1, 2, 7, 1 << 20, 1 << 31, (1 << 62) + 1, (1 << 63) - 1, -(1 << 63))
INT_EDGES = (0, -1, 1 << 40, (1 << 63) - 1, -(1 << 63))
FLOAT_EDGES = (math.nan, math.inf, -math.inf, 1e300, -0.0, 5e-324)


class Damage:
    """Seeded damage to one frame's commands; `handles`: the handles the stream named so far (live or freed)."""

    def __init__(self, rng: random.Random, base: int, neighbour: int, live: dict[int, Any]) -> None:
        self.rng = rng
        self.base = base
        self.neighbour = neighbour
        self.live = live  # the reference session's tensors (the same handles live in all three)
        self.seen: list[int] = []
        self.freed: list[int] = []

    def note(self, cmds: list[device_pb2.Command]) -> None:
        for c in cmds:
            if c.eager_op:
                f = Fields(c.eager_op)
                self.seen += [int.from_bytes(c.eager_op[at : at + 8], "little") for at in f.handles[:2]]
            elif c.HasField("free"):
                self.freed += list(c.free.handles)
        self.seen = self.seen[-256:]
        self.freed = self.freed[-256:]

    def frame(self, cmds: list[device_pb2.Command], aimed: set[int]) -> list[device_pb2.Command]:
        """`aimed`: the commands the native runner ran in the clean stream. Half the frames that have such commands
        get exactly one of them damaged (an earlier damaged record would end the learned run before it), the others
        a few records anywhere."""
        rng = self.rng
        cmds = list(cmds)
        eager = [k for k, c in enumerate(cmds) if c.eager_op]
        if aimed and rng.random() < 0.5:
            hit = [rng.choice(sorted(aimed))]
        else:
            hit = [k for k in eager if rng.random() < RATE] or ([rng.choice(eager)] if eager else [])
        for k in hit:
            how = rng.randrange(10)
            if k in aimed and rng.random() < 0.5:  # a record the runner takes: its handle fields, mostly
                how = 3
            if how == 7:  # drop, duplicate, swap records
                j = rng.choice(eager)
                what = rng.randrange(3)
                if what == 0:
                    cmds[k] = device_pb2.Command(eager_op=cmds[j].eager_op)
                elif what == 1:
                    cmds[k], cmds[j] = cmds[j], cmds[k]
                else:
                    cmds[k] = device_pb2.Command(eager_op=cmds[k].eager_op[:5] + b"\x00\x00\x00")  # a dropped op
                continue
            cmds[k] = device_pb2.Command(eager_op=self.record(cmds[k].eager_op, how, cmds))
        if rng.random() < SEEDS:  # `torch.manual_seed` mid-step: every session's stream starts again
            cmds.insert(rng.randrange(len(cmds) + 1), device_pb2.Command(seed=device_pb2.Seed(seed=rng.randrange(9))))
        return cmds

    def record(self, data: bytes, how: int, cmds: list[device_pb2.Command]) -> bytes:
        rng = self.rng
        out = bytearray(data)
        f = Fields(data)
        if how == 0 or (how >= 3 and not (f.handles or f.geometry or f.numbers)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif how == 1:
            del out[rng.randrange(1, len(out)) :]
        elif how == 2:
            out += bytes([rng.randrange(256)]) * rng.randint(1, 9)
        elif how in (3, 4, 5) and f.handles:
            outputs = f.handles[: data[5 + data[4]]] if len(data) > 5 + data[4] else []
            output = outputs and rng.random() < 0.4
            at = rng.choice(outputs if output else f.handles)
            later = [int.from_bytes(c.eager_op[6:14], "little") for c in cmds if len(c.eager_op) >= 14]
            fixed = [self.neighbour, self.base, 0, self.base + 0xFFFFFF, (self.base >> 32) + 7 << 32]
            pick = [[v] for v in fixed] + [v for v in (self.seen, self.freed, later) if v]
            if self.live:  # another live tensor, likely of another meta (three times as likely as each other kind)
                pick += [list(self.live)] * 3
            if output:  # the runner's own output checks: foreign, reserved, live, freed
                pick = [[self.neighbour], [self.base], [self.base], list(self.live or [0]), self.freed or [0]]
            out[at : at + 8] = (rng.choice(rng.choice(pick)) % (1 << 64)).to_bytes(8, "little")
        elif how == 6 and f.geometry:
            at = rng.choice(f.geometry)
            (old,) = _I64.unpack_from(out, at)
            value = rng.choice((*GEOMETRY_EDGES, old + 1, old - 1, old * 2, old * 1024))
            _I64.pack_into(out, at, max(-(1 << 63), min((1 << 63) - 1, value)))
        elif how in (8, 9) and f.numbers:
            at, code = rng.choice(f.numbers)
            if code == "q":
                _I64.pack_into(out, at, rng.choice(INT_EDGES))
            else:
                _F64.pack_into(out, at, rng.choice(FLOAT_EDGES))
        else:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)


# ---- three executors fed the same slices ----


class Three:
    """N: learned runs with the native runner; P: learned runs, the runner off; R: every command on its own."""

    def __init__(self, number: int, quota: int = QUOTA) -> None:
        self.ex = [CommandExecutor(slices.SliceLedger()) for _ in range(3)]
        self.ex[1].native = None
        self.draws = [0, 0, 0]  # random records each executor's Python path ran (`_seeded`)
        # every other slice N marks its progress as a worker does (`slices.word_mark`, the last mark compared): the
        # runner then keeps the GIL across its ops and pins their inputs (native_runner.cpp `Pins`, round 42)
        self.slices = 0
        for k, ex in enumerate(self.ex):
            ex._seeded = self._counted(ex._seeded, k)  # type: ignore[method-assign]
        self.s: list[WorkerSession] = []
        self.neighbours: list[WorkerSession] = []
        torch.manual_seed(0)
        self.kept = torch.randn(64)
        for ex in self.ex:
            ex.exclusive_rng = True
            dev = FakeDevice(0, "fuzz", 1 << 32)
            memory = DeviceMemory(dev)
            s = WorkerSession("fuzz", number, dev, memory, quota)
            s.rng_state = dev.new_rng_state(1234)
            self.s.append(s)
            n = WorkerSession("neighbour", number + 1, dev, memory, QUOTA)
            n.bind(self.neighbour_handle, self.kept.clone())
            self.neighbours.append(n)

    def _counted(self, seeded: Any, k: int) -> Any:
        def run(*a: Any) -> Any:
            self.draws[k] += 1
            return seeded(*a)

        return run

    @property
    def neighbour_handle(self) -> int:
        return (self.s[0].number + 1 << 32) + 1 if self.s else 0

    def slice(self, cmds: list[device_pb2.Command]) -> None:
        payload = device_pb2.ClientFrame(commands=cmds).SerializeToString()
        seen = []
        self.slices += 1
        word = self.slices % 2 == 0
        for k, (ex, s) in enumerate(zip(self.ex, self.s, strict=True)):
            ex.ledger.reset()
            execute = ex.execute if k < 2 else (lambda *a, ex=ex: ex.execute(*a))  # no `eager_span` behind it
            marks: list[int] = []
            req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, payload)
            buf = bytearray(struct.pack("<i", -1))
            mark = slices.word_mark(buf) if word and k == 0 else marks.append
            res = slices.run_commands(s, execute, ex.ledger, req, _Clock, mark)
            if word:  # the last mark each made (the word holds only that)
                marks = [struct.unpack("<i", buf)[0]] if k == 0 else marks[-1:] or [-1]
            err, s.error = s.error, None
            seen.append((res.executed, res.errors, res.used, res.ops, res.handles, marks,
                         None if err is None else (err.code, err.op, err.message)))  # fmt: skip
        assert seen[0] == seen[2], "native runner vs the plain path"
        assert seen[1] == seen[2], "learned Python path vs the plain path"
        self.same()

    def same(self) -> None:
        ref = self.s[2]
        for s in self.s[:2]:
            assert {h: (p.code, p.op, p.message) for h, p in s.poisoned.items()} == {
                h: (p.code, p.op, p.message) for h, p in ref.poisoned.items()
            }
            assert s.tensors.keys() == ref.tensors.keys()
            for h, t in s.tensors.items():
                u = ref.tensors[h]
                assert _meta(t) == _meta(u), hex(h)
                assert _bytes(t) == _bytes(u), hex(h)
            assert (s.used, s.ops, s.memory.used) == (ref.used, ref.ops, ref.memory.used)
            storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in s.tensors.values()}
            assert s.used == sum(storages.values())
        for n in self.neighbours:
            assert _bytes(n.tensors[self.neighbour_handle]) == _bytes(self.kept)

    def close(self) -> None:
        for ex, s in zip(self.ex, self.s, strict=True):
            s.release_all()
            ex.forget(s)
        for n in self.neighbours:
            n.release_all()


def _meta(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.dtype, t.shape, t.stride(), t.storage_offset())


def _bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""


class _Clock:
    def __enter__(self) -> list[float]:
        return [0.0]

    def __exit__(self, *a: Any) -> None:
        pass


_CLEAN: dict[Path, tuple[int, dict[int, set[int]]]] = {}


def clean(path: Path, frames: list[list[device_pb2.Command]], number: int) -> tuple[int, dict[int, set[int]]]:
    """The clean recording on N's path, once: the most bytes it holds at once (after a slice), and per frame the
    commands the native runner ran (the damage aims at them: most records of a training step are not its)."""
    if path not in _CLEAN:
        ex = CommandExecutor(slices.SliceLedger())
        ran: list[tuple[int, int, int]] = []
        mod = ex.native
        if mod is not None:

            class Ctx:  # the module's Ctx, noting which records its `run` took
                def __init__(self, *a: Any) -> None:
                    self.ctx = mod.Ctx(*a)

                def run(self, *a: Any) -> Any:
                    got = self.ctx.run(*a)
                    ran.append((a[3], got[0] + (got[4] is not None), len(a[2])))
                    return got

                def __getattr__(self, name: str) -> Any:  # (`between`: the module's Ctx's own)
                    return getattr(self.ctx, name)

            ex.native = type("Native", (), {"Ctx": Ctx, "__getattr__": lambda _, name: getattr(mod, name)})()
        dev = FakeDevice(0, "fuzz", 1 << 32)
        s = WorkerSession("clean", number, dev, DeviceMemory(dev), QUOTA)
        most = 0
        aimed: dict[int, set[int]] = {}
        for n, cmds in enumerate(frames):
            for at in range(0, len(cmds), 64):
                ran.clear()
                payload = device_pb2.ClientFrame(commands=cmds[at : at + 64]).SerializeToString()
                req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, payload)
                slices.run_commands(s, ex.execute, ex.ledger, req, _Clock)
                most = max(most, s.used)
                # (the records among them: since round 40 a run's uploads and frees run in `Ctx.run` too)
                took = (at + k for i, j, _ in ran for k in range(i, j))
                aimed.setdefault(n, set()).update(k for k in took if cmds[k].eager_op)
        s.release_all()
        ex.forget(s)
        _CLEAN[path] = most, aimed
    return _CLEAN[path]


def fuzz(path: Path, seed: int) -> tuple[int, int]:
    """One case: the recording's warm-up clean, every later frame damaged. Returns (records the native runner ran,
    records run inside learned runs by N). Every other case runs under a quota just above what the clean stream
    holds, so that a record whose inputs are not what its step learned meets the quota (the learned verdict would
    admit what the real one refuses, with another message)."""
    d = json.loads(path.read_text())
    frames = [list(device_pb2.ClientFrame.FromString(bytes.fromhex(f)).commands) for f in d["frames"]]
    rng = random.Random(seed)
    most, aimed = clean(path, frames, d["number"])
    quota = QUOTA if seed % 2 == 0 else most * rng.choice([101, 105, 120]) // 100
    three = Three(d["number"], quota)
    damage = Damage(rng, three.s[0].handle_base, three.neighbour_handle, three.s[2].tensors)
    try:
        for n, cmds in enumerate(frames):
            if n >= d["start"]:
                cmds = damage.frame(cmds, aimed.get(n, set()))
            damage.note(cmds)
            cuts = [rng.choice([5, 12, 64, 64, 64])] if n >= d["start"] else [64]
            i = 0
            while i < len(cmds):
                three.slice(cmds[i : i + cuts[0]])
                i += cuts[0]
        runs = three.ex[0]._eager["fuzz"][3]
        assert three.ex[1]._eager["fuzz"][3].native == 0
        # random ops (the encoder's dropout): the runner drew most of them itself (`Three.draws`: Python's draws)
        assert three.draws[0] < three.draws[1] or three.draws[1] == 0 or native_runner.load() is None, three.draws
        return runs.native, runs.hits
    finally:
        three.close()


@pytest.mark.parametrize("case", range(CASES))
@pytest.mark.parametrize("model", MODELS)
def test_damaged_training_streams_run_alike_with_the_runner_on_off_and_without_runs(
    model: str, case: int, recordings: Path
) -> None:
    mod = native_runner.load()
    pinned = mod.pinned() if mod is not None else 0
    native, hits = fuzz(recordings / f"{model}.json", SEED * 1000 + case)
    pinned = (mod.pinned() if mod is not None else 0) - pinned
    print(f"{model} case {case}: {hits} records in learned runs, {native} of them by the native runner, "
          f"{pinned} pinned")  # fmt: skip
    if mod is not None:
        assert native > 0, "the native runner never ran"
        if len(sys._current_frames()) == 1:  # no other Python thread here: the word-marked slices pin
            assert pinned > 0, "no record ran pinned"
