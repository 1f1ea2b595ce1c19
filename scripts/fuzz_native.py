"""A fuzz of the C++ paths that read a client's bytes (server/native_runner.cpp): the frame readers (`eager_frame`,
also as `lazy` (round 49: the uploads and frees it reads upb never parses), `eager_records`, `split_frame` and the
front's `plain_uploads`, `graph_frame`: frames of RunGraphs, round 44), the parsers of uploads and frees among
a run's records (`parse_upload`, `parse_meta`, `parse_free`, run by `Ctx::between`) and `free` (`free_handles`),
in-process and through a live daemon.

Modes (each bounded by --seconds; --seed makes the inputs reproducible; the summary line counts the inputs):

  parsers  in-process, no daemon: structure-aware and mutated frames, Upload and Free messages (truncated and
           overlong varints, lengths past the end, negative and huge sizes, dtypes, offsets, shapes with zero and
           overflowing products, fields twice, unknown fields, other wire types) against the references: upb's
           parse of the same bytes (`eager_frame`, `eager_records`, `graph_frame`: a fifth of the frames are
           RunGraph commands, hostile ones), `slices.py_split_frame` (`split_frame`), and
           `WorkerSession.free` on an identical session (`free`: the same tensors, poisons, uploads, accounting and
           error); frames of uploads and frees (round 50, `BetweenBench`): each one the lazy `eager_frame` reads run
           from its bytes outside a run (`CommandExecutor.run_between`, `Ctx.between`) on one session and through
           upb's message (`execute`) on its twin: the same tensors, poisons, accounting, storages, error (secrev51:
           now and then on sessions at their quota's, device's and handle limit's edges, with pinned handles, whose
           tensor unbound or replaced must move `pins`, and an upload pool holding memory); at the end
           an upload split at every byte (two chunks) and at pairs of bytes (three), frees among the chunks, with
           the runner on and off: exactly the bytes sent, the same accounting.
  runs     in-process: a recorded training stream (bench/eager_replay.py --dump) replayed into three executors
           (tests/integration/test_runner_fuzz.py `Three`: the native runner, the Python path, every command on its
           own), its uploads and frees among the records damaged at the byte level, RunGraphs (of no defined
           graph) among them and now and then a slice of RunGraphs only (`slices.run_commands`' raw path), uploads
           split into chunks at random bytes, frees of live, freed, foreign and reserved handles inserted among the
           records; after every slice the three must agree on everything a client can observe, a neighbour
           session's tensor bit-exact.
  daemon   a live `gpupool serve` on loopback (the plain build: ASan cannot run in a sandboxed worker): a hostile
           session replays the same damaged streams (handles moved to its own base) while a neighbour computes and
           downloads verified results; every error status must be one a client can act on (never INTERNAL or
           UNKNOWN), only malformed bytes may end the hostile stream, the daemon stays up, and at the end the
           device holds only the neighbour's bytes.
  graphs   in-process (round 44): RunGraph frames (`GraphGen`: damaged fields and bytes, overlong lengths, other
           graphs' and sessions' ids and handles, a DropGraph among runs, frames of 64 KiB - 1 to 64 KiB + 1 bytes)
           run by twin sessions of one traced graph (tests/unit/test_server_graph_quick.py `Twin`): one whose quiet
           runs read a lone frame's bytes in C++ (`native_runner.graph_frame`, `GraphPlan.run_raw`),
           one that parses them; both must say and hold the same, and the front's readers agree on each frame.
           (secrev51) Half the twins hold a second graph of the shape, run now and then among the first's: at most
           one plan of the session keeps its inputs sent by value (`GraphPlan.spares`), the session's `spare_plan`.
  graph-daemon  those frames through a live `gpupool serve --bulk-listen`, from hostile sessions on their side
           sockets (frames there) and their streams, each graph quiet and traced first: every error actionable,
           only malformed frames end a session, a session that goes on computes right; a neighbour's matmuls and its
           own graph of the same id checked throughout; the daemon SERVING and exiting 0 at the end.

  attention  in-process (round 46): enc45's C++ compositions of the fused attention with dropout (`attn::run`'s
           forward and backward, called as `attention_forward` / `attention_backward`) on hostile calls (dtypes,
           zero sizes, shapes the validators refuse, inputs as expanded, overlapping, transposed and offset views of
           one storage, biases, dropout and scale out of range, backward seeds forged, of the state alone, off by 8
           bytes, at an offset, of another dtype or dim, or the query's own storage) against the Python runs
           (server/attention.py): each declined with nothing drawn, or the same values, kept storage and generator
           state bit for bit; never a call the Python run refuses.

Under AddressSanitizer and UBSan (the in-process modes): scripts/fuzz_native.sh runs this script in the
environment scripts/runner_asan.sh sets (scripts/asan_env.sh: the sanitized build, `GPUPOOL_NATIVE_RUNNER_SANITIZE=1`,
in a Python with the ASan runtime preloaded). Recordings: `python bench/eager_replay.py --dump tiny-mlp OUT.json`.

    bash scripts/fuzz_native.sh parsers --seconds 600 --seed 1 --recording /tmp/rec/tiny-mlp.json
    bash scripts/fuzz_native.sh runs --seconds 600 --seed 1 --recording /tmp/rec/tiny-mlp.json
    python scripts/fuzz_native.py daemon --seconds 300 --seed 1 --recording /tmp/rec/tiny-mlp.json
    bash scripts/fuzz_native.sh graphs --seconds 600 --seed 1
    bash scripts/fuzz_native.sh attention --seconds 600 --seed 1
    python scripts/fuzz_native.py graph-daemon --seconds 300 --seed 1 --daemon-flag=--isolation --daemon-flag=thread

A failure prints the seed and the input's number (parsers: `--seed S --skip N` starts at that input; runs: the
case's seed).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

import torch  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402

from gpupool import wire  # noqa: E402
from gpupool._proto import device_pb2  # noqa: E402

U64 = (1 << 64) - 1
DTYPES = sorted(wire.TORCH_DTYPES)  # the wire's dtype numbers
UPLOAD_KEY, FREE_KEY = 0x12, 0x22  # `Command.upload` (2) and `Command.free` (4), length-delimited
RUN_GRAPH = device_pb2.Command.DESCRIPTOR.fields_by_name["run_graph"].number


# ---- protobuf bytes by hand ----


def varint(v: int, extra: int = 0) -> bytes:
    """`v` (mod 2**64) as a varint; `extra` > 0: that many more bytes (an overlong form, the value the same)."""
    v &= U64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v or extra:
            out.append(b | 0x80)
        else:
            out.append(b)
            break
        if not v:
            break
    if extra:
        out += b"\x80" * (extra - 1) + b"\x00"
    return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def ld(field: int, body: bytes) -> bytes:
    return key(field, 2) + varint(len(body)) + body


def frame_of(bodies: list[bytes]) -> bytes:
    """A ClientFrame of these command bodies (each one `commands` entry)."""
    return b"".join(b"\x0a" + varint(len(b)) + b for b in bodies)


class Gen:
    """Seeded inputs: handles, Upload and Free messages built field by field, then damaged."""

    def __init__(self, rng: random.Random, number: int) -> None:
        self.rng = rng
        self.number = number
        self.base = number << 32
        self.live: list[int] = []
        self.freed: list[int] = []
        self.metas: dict[int, tuple[int, list[int]]] = {}  # live handles' (wire dtype, shape), where known

    def fitting(self) -> bytes:
        """A well-formed upload or free that `Ctx::between` runs itself: a live handle's new value (its dtype and
        shape: the records after it read it), a new handle's tensor, or a free of a live or new handle."""
        r = self.rng
        h = r.choice(sorted(self.metas))
        dtype, shape = self.metas[h]
        how = r.randrange(4)
        if how == 1:
            h, dtype, shape = self.base + 0x100000 + r.randrange(8), r.choice(DTYPES), [r.randrange(4)] * r.randrange(3)
        if how == 3:
            return device_pb2.Command(
                free=device_pb2.Free(handles=[h, self.base + 0x100000 + r.randrange(8)])
            ).SerializeToString()
        t = (
            torch.randint(0, 2, shape, dtype=wire.TORCH_DTYPES[dtype])
            if dtype == 10
            else torch.randn(shape).to(wire.TORCH_DTYPES[dtype])
            if wire.TORCH_DTYPES[dtype].is_floating_point or wire.TORCH_DTYPES[dtype].is_complex
            else torch.randint(0, 100, shape, dtype=wire.TORCH_DTYPES[dtype])
        )
        up = device_pb2.Upload(handle=h, data=wire.tensor_to_bytes(t), last=True)
        up.meta.dtype, up.meta.shape[:] = dtype, shape
        return device_pb2.Command(upload=up).SerializeToString()

    def handle(self) -> int:
        r = self.rng
        pick = r.randrange(12)
        if pick < 5 and self.live:
            return r.choice(self.live)
        if pick < 7 and self.freed:
            return r.choice(self.freed)
        return r.choice(
            [self.base, 0, U64, (self.number + 1 << 32) + 1, (self.number - 1 << 32) + 1, self.base + (1 << 32) - 1,
             self.base + r.randrange(1, 64), r.getrandbits(64), self.base + 1]
        )  # fmt: skip

    def num(self) -> int:
        """An edge value for a varint field."""
        r = self.rng
        return r.choice([0, 1, 2, 63, 64, 65, 127, 128, (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 62), (1 << 63) - 1,
                         1 << 63, U64, U64 - 1, r.getrandbits(r.choice([7, 14, 32, 64]))])  # fmt: skip

    def vint(self, v: int) -> bytes:
        return varint(v, self.rng.choice([0] * 12 + [1, 2, 5]))

    def shape(self) -> list[int]:
        r = self.rng
        how = r.randrange(10)
        if how < 5:
            return [r.randrange(0, 5) for _ in range(r.randrange(0, 4))]
        if how == 5:
            return [r.choice([0, 1, 2, 1 << 31, 1 << 62, (1 << 63) - 1, 3]) for _ in range(r.randrange(1, 5))]
        if how == 6:
            return [1] * r.choice([63, 64, 65, 70])
        if how == 7:
            return [0, *[r.choice([1 << 31, 1 << 62, (1 << 63) - 1]) for _ in range(r.randrange(1, 4))]]
        if how == 8:
            return [r.choice([-1, -(1 << 63), 2, 0]) for _ in range(r.randrange(1, 3))]
        return [r.randrange(0, 300)]

    def upload(self, h: int | None = None, shape: list[int] | None = None, dtype: int | None = None) -> bytes:
        """An Upload message: mostly one that could be real (its data the tensor's bytes), with damage."""
        r = self.rng
        h = self.handle() if h is None else h
        dtype = r.choice(DTYPES) if dtype is None else dtype
        shape = self.shape() if shape is None else shape
        n = 1
        for d in shape:
            n *= max(d, 0)
        itemsize = wire.TORCH_DTYPES[dtype].itemsize if dtype in wire.TORCH_DTYPES else 4
        size = n * itemsize if n * itemsize <= 1 << 16 else r.randrange(0, 64)
        data = bytes(r.getrandbits(1) if dtype == 10 else r.randrange(256) for _ in range(size))
        if dtype == 10 and data and r.random() < 0.2:
            data = data[:-1] + bytes([r.choice([2, 0x80, 0xFF])])
        meta: list[bytes] = [key(1, 0) + self.vint(dtype)]
        dims = [self.vint(d) for d in shape]
        if r.random() < 0.5:
            meta.append(ld(2, b"".join(dims)) if dims else b"")
        else:
            meta += [key(2, 0) + d for d in dims]
        if r.random() < 0.2:
            meta.append(ld(3, b"".join(self.vint(r.choice([1, 0, -1, 1 << 40])) for _ in shape)))
        if r.random() < 0.1:
            meta.append(key(4, 0) + self.vint(self.num()))
        if r.random() < 0.3:
            r.shuffle(meta)
        fields: list[bytes] = [key(1, 0) + self.vint(h), ld(2, b"".join(meta)), ld(4, data), key(5, 0) + self.vint(1)]
        for _ in range(r.choice([0, 0, 0, 0, 0, 1, 1, 2, 3])):
            self.damage_fields(fields, meta)
        if r.random() < 0.3:
            r.shuffle(fields)
        body = b"".join(fields)
        if r.random() < 0.15:
            body = self.bytes_damage(body)
        return body

    def damage_fields(self, fields: list[bytes], meta: list[bytes]) -> None:
        r = self.rng
        how = r.randrange(16)
        if how == 0 and fields:
            del fields[r.randrange(len(fields))]
        elif how == 1 and fields:
            fields.append(r.choice(fields))  # a field twice
        elif how == 2:
            fields.append(key(3, 0) + self.vint(self.num()))  # an offset
        elif how == 3:
            fields.append(key(5, 0) + self.vint(r.choice([0, 2, 1 << 32, U64])))  # `last` not 1
        elif how == 4:
            fields.append(key(r.choice([6, 7, 15, 16, 60, 536870911]), r.choice([0, 1, 2, 5])) + b"\x01" * 8)
        elif how == 5:  # another wire type for a known field
            f = r.randrange(1, 6)
            fields.append(key(f, r.choice([0, 1, 2, 5])) + (varint(3) + b"abc" if r.random() < 0.5 else b"\x00" * 8))
        elif how == 6:  # a length past the end
            fields.append(key(4, 2) + varint(r.choice([1, 100, 1 << 31, U64])) + b"xy")
        elif how == 7:  # a truncated varint
            fields.append(key(r.choice([1, 3, 5]), 0) + b"\xff" * r.randrange(1, 11))
        elif how == 8:  # an 11-byte varint, or a 10th byte > 1
            fields.append(key(1, 0) + b"\xff" * 9 + bytes([r.choice([2, 0x7F, 0x81])]))
        elif how == 9:
            fields.append(ld(60, b""))  # `bulk_bytes` as bytes
            fields.append(key(60, 0) + varint(r.randrange(1, 1 << 20)))
        elif how == 10:  # meta twice (upb merges them)
            fields.append(ld(2, key(2, 0) + varint(r.randrange(5))))
        elif how == 11:  # the meta's own damage
            m = list(meta)
            m.append(r.choice([key(1, 0) + self.vint(self.num()), key(2, 0) + self.vint(self.num()), key(4, 2) +
                               varint(1) + b"x", key(2, 2) + varint(r.choice([3, 100])) + b"\x01", key(9, 0) +
                               b"\x00", key(1, 2) + varint(0), b"\x80", key(2, 5) + b"\x00" * 4]))  # fmt: skip
            fields.append(ld(2, b"".join(m)))
        elif how == 12:  # data one byte short or long
            fields.append(ld(4, bytes(r.randrange(1, 17))))
        elif how == 13:  # an overlong tag
            fields.append(varint(1 << 3, r.randrange(1, 6)) + varint(self.handle()))
        elif how == 14:  # a huge meta length
            fields.append(key(2, 2) + varint(r.choice([1 << 31, (1 << 32) + 2, U64])) + b"\x08\x01")
        else:
            fields.append(key(1, 0) + self.vint(self.handle()))

    def bytes_damage(self, b: bytes) -> bytes:
        r = self.rng
        out = bytearray(b)
        for _ in range(r.randrange(1, 4)):
            how = r.randrange(5)
            if how == 0 and out:
                out[r.randrange(len(out))] ^= 1 << r.randrange(8)
            elif how == 1 and out:
                del out[r.randrange(len(out)) :]
            elif how == 2:
                at = r.randrange(len(out) + 1)
                out[at:at] = bytes(r.randrange(256) for _ in range(r.randrange(1, 6)))
            elif how == 3 and out:
                at = r.randrange(len(out))
                del out[at : at + r.randrange(1, 4)]
            elif out:
                out[r.randrange(len(out))] = r.choice([0, 0x80, 0xFF, 0x7F, 0x08, 0x0A, 0x12])
        return bytes(out)

    def free(self, handles: list[int] | None = None) -> bytes:
        """A Free message: packed, one field a handle, or both, with damage now and then."""
        r = self.rng
        hs = [self.handle() for _ in range(r.randrange(0, 6))] if handles is None else handles
        parts: list[bytes] = []
        rest = list(hs)
        while rest:
            take = rest[: r.randrange(1, len(rest) + 1)]
            rest = rest[len(take) :]
            if r.random() < 0.5:
                parts.append(ld(1, b"".join(self.vint(h) for h in take)))
            else:
                parts += [key(1, 0) + self.vint(h) for h in take]
        if r.random() < 0.15:
            parts.append(r.choice([key(1, 0) + b"\xff" * 10 + b"\x01", key(1, 0) + b"\xff" * 9 + b"\x02", key(1, 2) +
                                   varint(5) + b"\x01", key(2, 0) + b"\x01", key(1, 1) + b"\x00" * 8, ld(1, b"\xff"),
                                   key(1, 0), b"\x08\x80", ld(1, b"")]))  # fmt: skip
        body = b"".join(parts)
        if r.random() < 0.1:
            body = self.bytes_damage(body)
        return body

    def run_graph(self) -> bytes:
        """A `Command` holding a `run_graph` (round 44: native_runner.cpp `graph_frame` reads frames of them): its
        fields in any order and repeated, `inputs`/`outputs`/`drop_writes` packed or not (a packed length that
        ends inside a varint now and then), overlong and 10-byte varints, `input_data`, unknown fields and other
        wire types; mostly canonical as a command (key aa 01), now and then an overlong length, a field after it,
        a length past its end, or damaged bytes."""
        r = self.rng
        parts = []
        for _ in range(r.randrange(6)):
            k = r.random()
            if k < 0.2:
                parts.append(key(1, 0) + self.vint(r.choice([0, 1, 2, 7, U64, r.getrandbits(64)])))
            elif k < 0.55:
                f = r.choice([2, 3, 4])
                if r.random() < 0.5:
                    parts.append(key(f, 0) + self.vint(self.handle()))
                else:
                    body = b"".join(self.vint(self.handle()) for _ in range(r.randrange(4)))
                    cut = r.random() < 0.1 and len(body) > 0
                    parts.append(key(f, 2) + varint(len(body) - cut) + body)
            elif k < 0.8:
                parts.append(ld(10, bytes(r.randrange(64))))
            else:
                parts.append(r.choice([key(1, 0) + b"\xff" * 9 + b"\x02", key(1, 2) + varint(1) + b"\x01",
                                       key(5, 0) + b"\x01", key(10, 0) + b"\x01", key(2, 1) + bytes(8),
                                       key(2, 5) + bytes(4), ld(11, b"x"), key(1, 0)]))  # fmt: skip
        body = b"".join(parts)
        if r.random() < 0.1:
            body = self.bytes_damage(body)
        how = r.randrange(12)
        if how == 0:
            return b"\xaa\x01" + varint(len(body), r.randrange(1, 4)) + body
        if how == 1:
            return b"\xaa\x01" + varint(len(body)) + body + ld(5, varint(7))  # a second member: seed
        if how == 2:
            return b"\xaa\x01" + varint(len(body) + 1) + body
        return b"\xaa\x01" + varint(len(body)) + body

    def command(self, body: bytes, kind: int) -> bytes:
        """A `Command` holding `body` as its `upload` or `free` field: mostly canonical; now and then an overlong
        length, a second member or a trailing field."""
        r = self.rng
        how = r.randrange(12)
        if how == 0:
            return bytes([kind]) + varint(len(body), r.randrange(1, 4)) + body
        if how == 1:
            return bytes([kind]) + varint(len(body)) + body + ld(5, varint(7))  # a second member: seed
        if how == 2:
            return ld(30, b"\x00" * 8) + bytes([kind]) + varint(len(body)) + body
        if how == 3:
            return bytes([kind]) + varint(len(body)) + body + bytes([kind]) + varint(len(body)) + body
        return bytes([kind]) + varint(len(body)) + body


# ---- parsers: each reader against its reference ----


def _upb(payload: bytes) -> Any:
    try:
        return device_pb2.ClientFrame.FromString(payload).commands
    except DecodeError:
        return None


def _record(cmd: Any) -> bytes:
    return cmd.eager_op if cmd.WhichOneof("cmd") == "eager_op" else b""


def check_frame(mod: Any, payload: bytes) -> str:
    """`eager_frame`, `eager_records` and `split_frame` of one frame against upb's parse and the Python reading.
    Returns what the readers did (for the counts)."""
    from gpupool.server import slices

    cmds = _upb(payload)
    got = mod.eager_frame(payload, True)
    if got is not None:
        records, at, others, ask, between = got
        others_cmds = _upb(others) if others else []
        if cmds is None:
            assert others_cmds is None, "upb refuses the frame but parses the commands the reader left to it"
        else:
            assert len(records) == len(cmds), (len(records), len(cmds))
            assert others_cmds is not None and len(others_cmds) == len(at)
            for i, c in enumerate(cmds):
                if i in at:
                    assert others_cmds[at[i]] == c, i
                    if i not in ask:
                        assert records[i] == _record(c), i
                else:
                    assert c.WhichOneof("cmd") == "eager_op" and records[i] == c.eager_op, i
            if between is not None:
                assert len(between) == len(cmds)
                for i, b in enumerate(between):
                    if b is not None:
                        kind = cmds[i].WhichOneof("cmd")
                        assert kind in ("upload", "free") and device_pb2.Command.FromString(b) == cmds[i], i
    lazy = mod.eager_frame(payload, True, True)
    if lazy is not None:  # round 49 (`slices.frame_commands`): the uploads and frees it reads are never upb's to parse
        records, at, others, ask, between = lazy
        others_cmds = _upb(others) if others else []
        for i, b in enumerate(between or []):
            if b is not None:  # one it reads is one upb takes, alone (a DecodeError here: a hostile one ran unparsed)
                assert i not in at and device_pb2.Command.FromString(b).WhichOneof("cmd") in ("upload", "free"), i
        if cmds is None:
            assert others_cmds is None, "upb refuses the frame but parses what the lazy reading left to it"
        else:
            assert len(records) == len(cmds) and others_cmds is not None and len(others_cmds) == len(at)
            for i, c in enumerate(cmds):
                if i in at:
                    assert others_cmds[at[i]] == c, i
                    if i not in ask:
                        assert records[i] == _record(c), i
                elif between is not None and between[i] is not None:
                    assert device_pb2.Command.FromString(between[i]) == c and records[i] == b"", i
                else:
                    assert c.WhichOneof("cmd") == "eager_op" and records[i] == c.eager_op, i
    runs = mod.graph_frame(payload)
    if runs is not None:  # a frame of RunGraphs only: upb parses it, and each one's bytes, to the same commands
        assert cmds is not None, "graph_frame read a frame upb refuses"
        assert len(runs) == len(cmds), (len(runs), len(cmds))
        for c, (gid, raw) in zip(cmds, runs, strict=True):
            msg = device_pb2.RunGraph.FromString(raw)
            assert device_pb2.Command(run_graph=msg) == c and gid == msg.graph_id, "graph_frame"
    recs = mod.eager_records(payload)
    if recs is not None and cmds is not None:
        assert recs == [_record(c) for c in cmds], "eager_records"
    for max_commands, raw in ((1 << 20, payload), (3, payload), (1 << 20, memoryview(bytearray(payload)))):
        fast = mod.split_frame(raw, max_commands, slices.UPLOAD, slices.GET)  # (a side socket's buffer: a view)
        if fast is None:
            continue
        marks: list[int] = []
        ref = slices.py_split_frame(payload, max_commands, marks)
        assert [(k, bytes(s)) for k, s in fast[0]] == [(k, bytes(s)) for k, s in ref], "split_frame"
        assert fast[1] == marks, "split_frame marks"
        # its RunGraph flag (round 45: the front skips its protobuf check of a small frame without one): what the
        # kinds say, and set wherever `graph_frame` takes the frame (a worker runs those without a parse)
        assert fast[2] is (RUN_GRAPH in [k for k, _ in ref]), "split_frame's RunGraph flag"
        assert fast[2] or runs is None or not ref, "a frame graph_frame runs, not flagged by split_frame"
        # the front's reader (round 49, `slices.unread_bulk`): an Upload it does not leave to upb is one upb takes,
        # alone, with no bulk_bytes
        rest = mod.plain_uploads(fast[0], fast[1])
        assert rest == [n for n in fast[1] if n in rest], "plain_uploads: not in order, or not marked"
        for n in fast[1]:
            if n not in rest:
                got = device_pb2.ClientFrame.FromString(bytes(fast[0][n][1])).commands
                assert len(got) == 1 and got[0].WhichOneof("cmd") == "upload" and not got[0].upload.bulk_bytes, n
    if runs is not None:
        return "run_graphs read"
    return "parsed" if cmds is not None else "refused"


def twin_session(number: int, fake: bool = True) -> Any:
    """A fuzz bench's session (`FreeBench`, `BetweenBench`): four handles bound, two of them on one storage."""
    from gpupool.server.devices import FakeDevice
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    dev = FakeDevice(0, "fz", 1 << 30)
    dev.fake = fake
    s = WorkerSession("fz", number, dev, DeviceMemory(dev), 1 << 24)
    base = number << 32
    t = torch.arange(12.0)
    s.bind(base + 1, t)
    s.bind(base + 2, t[2:5])  # the same storage
    s.bind(base + 3, torch.ones(3, dtype=torch.int16))
    s.bind(base + 4, torch.zeros(0))
    return s


class FreeBench:
    """Two identical sessions: `free` (C++) on one, `WorkerSession.free` on the other, compared."""

    NUMBER = 5

    def __init__(self) -> None:
        from gpupool.server.sessions import Poison
        from grpc import StatusCode

        self.pair = []
        base = self.NUMBER << 32
        for _ in range(2):
            s = twin_session(self.NUMBER)
            s.bind(base + 5, torch.ones(4))
            s.uploads[base + 5] = 4  # an upload under way
            s.poisoned[base + 6] = Poison(StatusCode.INVALID_ARGUMENT, "op", "failed")
            self.pair.append(s)

    def state(self, s: Any) -> tuple[Any, ...]:
        return (sorted(s.tensors), sorted(s.poisoned), sorted(s.uploads.items()), s.used, s.memory.used,
                sorted(tuple(v) for v in s._storages.values()))  # fmt: skip

    def check(self, mod: Any, msg: bytes) -> str:
        a, b = self.pair
        try:
            done = mod.free(a, msg, None)
            err_a = None
        except Exception as exc:  # noqa: BLE001 - compared below
            done, err_a = True, exc
        if not done:
            return "left"
        try:
            hs = list(device_pb2.Free.FromString(msg).handles)
        except DecodeError:
            raise AssertionError(f"free ran a message upb refuses: {msg.hex()}") from None
        try:
            b.free(hs)
            err_b = None
        except Exception as exc:  # noqa: BLE001
            err_b = exc
        assert (type(err_a), str(err_a)) == (type(err_b), str(err_b)), (err_a, err_b)
        assert self.state(a) == self.state(b), (self.state(a), self.state(b))
        return "error" if err_a is not None else "freed"


class BetweenBench:
    """Two identical sessions (round 50): a command's bytes that the lazy `eager_frame` reads as an upload or a free
    (`slices.FrameCommands.between`) run from those bytes on one (`CommandExecutor.run_between`, native_runner.cpp
    `Ctx::between_one`; where it leaves one to Python, `execute` of upb's message of it, as the slice loop does),
    through upb's message on the other (`execute`: the path before round 50); the same tensors (dtype, shape, bytes),
    poisons, uploads under way, accounting, storages, first error and replies after each."""

    NUMBER = FreeBench.NUMBER
    ran = 0  # commands run from their bytes, all benches

    def __init__(self, fake: bool = True, tight: tuple[int, int, int] | None = None) -> None:
        from gpupool.server.executor import CommandExecutor
        from gpupool.server.slices import SliceLedger

        # fake False: as a real GPU's session (its uploads Python's, its frees the runner's)
        self.pair = [(CommandExecutor(SliceLedger()), twin_session(self.NUMBER, fake), []) for _ in range(2)]
        self.tight = tight
        if tight is not None:  # (secrev51) the checks `Ctx::upload` makes before it declines, at their edges
            quota_room, device_room, handles_room = tight
            for _, s, _ in self.pair:
                s.quota = s.used + quota_room
                s.memory.device.capacity = s.memory.used + device_room
                s.max_handles = len(s.tensors) + len(s.poisoned) + handles_room
                s.pinned.add((self.NUMBER << 32) + 1)  # a graph's persistent tensor: freeing or binding it anew
                s.pinned.add((self.NUMBER << 32) + 3)  # moves `pins`
                if fake:  # the host memory of a freed big upload, kept (`admit` sheds it near the quota)
                    s.upload_pool.take_upload([64], torch.float32)

    def state(self, s: Any, replies: list[Any]) -> tuple[Any, ...]:
        err, s.error = s.error, None
        return (
            s.upload_pool.held,
            {h: (str(v.dtype), tuple(v.shape),  # (the bytes of one half uploaded: not yet written, never read)
                 b"" if h in s.uploads else bytes(v.contiguous().view(-1).view(torch.uint8).numpy()))
             for h, v in s.tensors.items()},
            {h: (p.code, p.message) for h, p in s.poisoned.items()}, sorted(s.uploads.items()), s.used, s.memory.used,
            sorted(tuple(v) for v in s._storages.values()), None if err is None else (err.code, err.message),
            [r if isinstance(r, bytes) else r.SerializeToString() for r in replies],
        )  # fmt: skip

    def check(self, mod: Any, payload: bytes) -> str:
        got = mod.eager_frame(payload, True, True)
        if got is None or got[4] is None:
            return "none"
        (ex, a, ra), (ex_b, b, rb) = self.pair
        for raw in got[4]:
            if raw is None:
                continue
            cmd = device_pb2.Command.FromString(raw)  # (`check_frame`: a DecodeError here is its failure)
            pinned = {h: a.tensors.get(h) for h in a.pinned}, a.pins
            if ex.run_between(a, raw, ra.append):
                BetweenBench.ran += 1
            else:
                ex.execute(a, cmd, ra.append)
            ex_b.execute(b, cmd, rb.append)
            # a pinned handle's tensor unbound or replaced moved `pins` (the graph plans' look-ups skipped while it
            # holds; a handle bound where none was moves nothing: its free moved it)
            moved = [h for h, t in pinned[0].items() if t is not None and a.tensors.get(h) is not t]
            assert not moved or a.pins > pinned[1], (raw.hex(), moved)
            sa, sb = self.state(a, ra), self.state(b, rb)
            assert sa == sb, (raw.hex(), [(x, y) for x, y in zip(sa, sb, strict=True) if x != y])
            ra.clear()
            rb.clear()
        return "compared" if self.tight is None else "compared at the edges"


def parsers(args: argparse.Namespace, mod: Any) -> Counter[str]:
    rng = random.Random(args.seed)
    counts: Counter[str] = Counter()
    records = _recorded_records(args)
    deadline = time.monotonic() + args.seconds
    n = 0
    bench: FreeBench | None = None
    between: BetweenBench | None = None
    while time.monotonic() < deadline and (args.inputs == 0 or n < args.inputs):
        n += 1
        seed = rng.getrandbits(64)  # each input from its own seed: --skip N starts at input N + 1 as it was
        if n <= args.skip:
            continue
        r = random.Random(seed)
        gen = Gen(r, FreeBench.NUMBER)
        gen.live = [(FreeBench.NUMBER << 32) + k for k in range(1, 7)]
        try:
            if r.random() < 0.3:
                if bench is None or r.random() < 0.2:
                    bench = FreeBench()
                counts["free:" + bench.check(mod, gen.free())] += 1
                continue
            if r.random() < 0.25:  # uploads and frees from their bytes outside a run (round 50)
                if between is None or r.random() < 0.05:
                    tight = None  # (secrev51) now and then the quota's, device's and handle limit's edges
                    if r.random() < 0.4:
                        tight = (r.choice([0, 1, 4, 16, 48, 100, 1024]), r.choice([0, 4, 48, 1024, 1 << 20]),
                                 r.choice([0, 1, 2, 8]))  # fmt: skip
                    between = BetweenBench(r.random() < 0.8, tight)
                gen.metas = {h: (1, [12]) for h in gen.live[:1]}
                cmds = [gen.fitting() if r.random() < 0.3 and gen.metas else
                        gen.command(gen.upload() if r.random() < 0.6 else gen.free(), r.choice([UPLOAD_KEY, FREE_KEY]))
                        for _ in range(r.randrange(1, 5))]  # fmt: skip
                counts["between:" + between.check(mod, frame_of(cmds))] += 1
                continue
            bodies = []
            graphs = r.random() < 0.2  # a frame of RunGraphs (`graph_frame`), now and then another command among them
            for _ in range(r.randrange(1, 9)):
                what = 10 if graphs and r.random() < 0.9 else r.randrange(11)
                if what == 10:
                    bodies.append(gen.run_graph())
                    continue
                if what < 3:
                    bodies.append(gen.command(gen.upload(), UPLOAD_KEY))
                elif what < 5:
                    bodies.append(gen.command(gen.free(), FREE_KEY))
                elif what < 8 and records:
                    rec = r.choice(records)
                    bodies.append(ld(30, rec if r.random() < 0.8 else gen.bytes_damage(rec)))
                elif what == 8:
                    bodies.append(r.choice([b"", ld(5, varint(3)), ld(6, varint(9)), ld(3, b"\x10\x01"), b"\xf2\x01",
                                            b"\xf2\x01\x00", b"\xf2\x81\x00\x01x"]))  # fmt: skip
                elif r.random() < 0.3:
                    bodies.append(bytes(r.randrange(256) for _ in range(r.randrange(0, 12))))
            payload = frame_of(bodies)
            if r.random() < 0.1:
                payload = gen.bytes_damage(payload)
            counts["frame:" + check_frame(mod, payload)] += 1
        except Exception:
            print(f"FAILED: --seed {args.seed} input {n} (its own seed {seed})", file=sys.stderr)
            raise
    counts["inputs"] = n - min(n, args.skip)
    counts["between: run from their bytes"] = BetweenBench.ran
    counts["upload splits"] = split_sweep(mod)
    return counts


def _recorded_records(args: argparse.Namespace) -> list[bytes]:
    out: list[bytes] = []
    for path in args.recording or []:
        d = json.loads(Path(path).read_text())
        for f in d["frames"][:6]:
            out += [c.eager_op for c in device_pb2.ClientFrame.FromString(bytes.fromhex(f)).commands if c.eager_op]
    return out[:400]


# ---- runs: damaged uploads and frees among a recorded stream's records, three executors compared ----


def damage_stream(gen: Gen, cmds: list[Any], hostile: float = 0.5, malformed: float = 0.3) -> list[bytes]:
    """The commands of one recorded frame as bodies, with their uploads and frees damaged and new ones inserted
    among the records (`gen.live`: the handles live before this frame); a damaged command upb refuses (which ends
    the frame, or the stream) is kept at the rate `malformed`, else the command is left as it was."""
    r = gen.rng
    out: list[bytes] = []
    for c in cmds:
        at = len(out)
        kind = c.WhichOneof("cmd")
        body = c.SerializeToString()
        if kind == "upload" and r.random() < hostile:
            up = c.upload
            how = r.randrange(6)
            if how == 0 and up.offset == 0 and up.HasField("meta") and up.last and 1 < len(up.data) <= 1 << 16:
                # split at a random byte: two chunks, records between them now and then
                k = r.randrange(1, len(up.data))
                first = device_pb2.Upload(handle=up.handle, meta=up.meta, data=up.data[:k], last=False)
                second = device_pb2.Upload(handle=up.handle, offset=k, data=up.data[k:], last=True)
                out.append(device_pb2.Command(upload=first).SerializeToString())
                if r.random() < 0.5:
                    out.append(
                        ld(4, ld(1, varint(up.handle)))
                        if r.random() < 0.2
                        else ld(5, key(1, 0) + varint(r.randrange(9)))
                    )
                out.append(device_pb2.Command(upload=second).SerializeToString())
                continue
            if how == 1:  # another dtype or shape over the same handle
                body = gen.command(gen.upload(h=up.handle), UPLOAD_KEY)
            elif how == 2:  # the real one, its fields damaged
                fields = [up.SerializeToString()]
                gen.damage_fields(fields, [up.meta.SerializeToString()])
                body = gen.command(b"".join(fields), UPLOAD_KEY)
            elif how == 3:
                body = gen.command(gen.bytes_damage(up.SerializeToString()), UPLOAD_KEY)
            elif how == 4:  # over another handle (live, freed, foreign, reserved)
                moved = device_pb2.Upload()
                moved.CopyFrom(up)
                moved.handle = gen.handle()
                body = device_pb2.Command(upload=moved).SerializeToString()
            else:
                body = gen.command(gen.upload(), UPLOAD_KEY)
        elif kind == "free" and r.random() < hostile:
            hs = list(c.free.handles)
            how = r.randrange(4)
            if how == 0:
                hs += [gen.handle() for _ in range(r.randrange(1, 4))]
                r.shuffle(hs)
            elif how == 1 and hs:
                hs = hs + hs[: r.randrange(1, len(hs) + 1)]  # freed twice
            elif how == 2:
                hs = [gen.handle()] + hs
            body = gen.command(gen.free(hs), FREE_KEY) if how < 3 else gen.command(gen.free(), FREE_KEY)
        out.append(body)
        if r.random() >= malformed and _refused(out[at:]):
            out[at:] = [c.SerializeToString()]
        if c.eager_op and gen.metas and r.random() < 0.04:  # one the runner may run itself (`between`)
            out.append(gen.fitting())
        if c.eager_op and r.random() < 0.03 * hostile:  # a free or an upload among the records
            if r.random() < 0.5:
                extra = gen.command(gen.free([gen.handle() for _ in range(r.randrange(1, 3))]), FREE_KEY)
            else:
                extra = gen.command(gen.upload(), UPLOAD_KEY)
            if r.random() < malformed or not _refused([extra]):
                out.append(extra)
        if c.eager_op and r.random() < 0.01 * hostile:  # a RunGraph (of no graph the session defined) among them
            extra = gen.run_graph()
            if r.random() < malformed or not _refused([extra]):
                out.append(extra)
    return out


def split_sweep(mod: Any, n: int = 29) -> int:
    """An upload of `n` bytes (a uint8 tensor) split into two chunks at every byte, and into three at every pair of
    bytes, each chunk a command of its own among frees of other handles, in one slice: with the runner (N) and
    without (P) the handle holds exactly the bytes sent, and the two sessions agree. Returns the splits run."""
    import test_runner_fuzz as F
    from gpupool.server import slices
    from gpupool.server.devices import FakeDevice
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    data = bytes((i * 89 + 7) % 256 for i in range(n))
    number = 6
    h, other = (number << 32) + 1, (number << 32) + 2
    cuts = [(k,) for k in range(1, n)] + [(a, b) for a in range(1, n) for b in range(a + 1, n) if (a + b) % 5 == 0]
    for cut in cuts:
        bounds = [0, *cut, n]
        bodies = []
        for j in range(len(bounds) - 1):
            up = device_pb2.Upload(handle=h, data=data[bounds[j] : bounds[j + 1]], last=j == len(bounds) - 2)
            up.offset = bounds[j]
            if j == 0:
                up.meta.dtype, up.meta.shape[:] = wire.dtype_to_proto(torch.uint8), [n]
            bodies.append(device_pb2.Command(upload=up).SerializeToString())
            bodies.append(device_pb2.Command(free=device_pb2.Free(handles=[other])).SerializeToString())
        seen = []
        for native in (mod, None):
            ex = CommandExecutor(slices.SliceLedger())
            ex.native = native
            dev = FakeDevice(0, "sweep", 1 << 30)
            s = WorkerSession("sweep", number, dev, DeviceMemory(dev), 1 << 20)
            s.bind(other, torch.ones(3))
            res = slices.run_commands(s, ex.execute, ex.ledger, slices.SliceRequest(1 << 40, 1 << 40, 1e9,
                                      frame_of(bodies)), F._Clock)  # fmt: skip
            assert s.error is None and not s.uploads and other not in s.tensors, (cut, s.error)
            assert F._bytes(s.tensors[h]) == data, cut
            seen.append((res.executed, s.used, s.memory.used, ex.ledger.uploaded))
        assert seen[0] == seen[1], (cut, seen)
    return len(cuts)


def _refused(bodies: list[bytes]) -> bool:
    try:
        for b in bodies:
            device_pb2.Command.FromString(b)
    except DecodeError:
        return True
    return False


def runs(args: argparse.Namespace, mod: Any) -> Counter[str]:
    import test_runner_fuzz as F

    counts: Counter[str] = Counter()
    deadline = time.monotonic() + args.seconds
    case = 0
    paths = [Path(p) for p in args.recording]
    views = getattr(mod, "plain_views", None)  # (round 47) views made without the dispatcher (`views_here`)
    before = views() if views is not None else 0
    while time.monotonic() < deadline and (args.inputs == 0 or counts["frames"] < args.inputs):
        path = paths[case % len(paths)]
        seed = args.seed * 100003 + case
        case += 1
        d = json.loads(path.read_text())
        frames = [list(device_pb2.ClientFrame.FromString(bytes.fromhex(f)).commands) for f in d["frames"]]
        rng = random.Random(seed)
        three = F.Three(d["number"], F.QUOTA if rng.random() < 0.7 else rng.choice([1 << 16, 1 << 20]))
        ran = _spy(three.ex[0])
        gen = Gen(rng, d["number"])
        hostile = rng.choice([0.5, 0.1])  # a gentle case: its runs go on longer, through more uploads and frees
        try:
            for n, cmds in enumerate(frames):
                gen.live = list(three.s[2].tensors)
                gen.metas = {h: (wire.dtype_to_proto(t.dtype), list(t.shape)) for h, t in three.s[2].tensors.items()
                             if h not in three.s[2].uploads and t.is_contiguous()}  # fmt: skip
                bodies = [c.SerializeToString() for c in cmds]
                if n >= d["start"]:
                    bodies = damage_stream(gen, cmds, hostile)
                gen.freed = [h for h in gen.freed + [h for c in cmds if c.HasField("free") for h in c.free.handles]
                             if h not in three.s[2].tensors][-64:]  # fmt: skip
                cut = rng.choice([5, 12, 64, 64, 64, 128]) if n >= d["start"] else 64
                for i in range(0, len(bodies), cut):
                    part = bodies[i : i + cut]
                    ran.clear()
                    outcome = _slice(three, frame_of(part))
                    counts[outcome] += 1
                    ups = [k for k, b in enumerate(part) if b[:1] in (b"\x12", b"\x22")]
                    counts["between in native runs"] += sum(1 for k in ups for a, b in ran if a <= k < b)
                    counts["between commands"] += len(ups)
                if rng.random() < 0.1:  # a slice of RunGraphs only (`graph_frame`): read from its bytes or parsed
                    graphs = frame_of([gen.run_graph() for _ in range(rng.randrange(1, 4))])
                    counts["run_graph " + _slice(three, graphs)] += 1
                counts["frames"] += 1
            counts["native records"] += three.ex[0]._eager["fuzz"][3].native
        except AssertionError:
            print(f"FAILED: {path.name} case seed {seed} (--seed {args.seed}, case {case - 1})", file=sys.stderr)
            raise
        finally:
            three.close()
        counts["cases"] += 1
    if views is not None:
        counts["plain views"] = views() - before
    return counts


def _spy(ex: Any) -> list[tuple[int, int]]:
    """The executor's native `Ctx.run` wrapped to note the commands each call ran: [(first, end)]."""
    ran: list[tuple[int, int]] = []
    mod = ex.native
    if mod is None:
        return ran

    class Ctx:
        def __init__(self, *a: Any) -> None:
            self.ctx = mod.Ctx(*a)

        def run(self, *a: Any) -> Any:
            got = self.ctx.run(*a)
            ran.append((a[3], got[0] + (got[4] is not None)))
            return got

        def __getattr__(self, name: str) -> Any:
            return getattr(self.ctx, name)

    ex.native = type("Native", (), {"Ctx": Ctx, "__getattr__": lambda _, name: getattr(mod, name)})()
    return ran


def _same(three: Any) -> None:
    """`Three.same`, where a handle half uploaded compares only the bytes written so far (the rest is memory no
    client can read: `resolve` refuses the handle until its last chunk, and a short last chunk poisons it)."""
    import test_runner_fuzz as F

    ref = three.s[2]
    for s in three.s[:2]:
        assert {h: (p.code, p.op, p.message) for h, p in s.poisoned.items()} == {
            h: (p.code, p.op, p.message) for h, p in ref.poisoned.items()
        }
        assert s.tensors.keys() == ref.tensors.keys() and s.uploads == ref.uploads
        for h, t in s.tensors.items():
            u = ref.tensors[h]
            assert F._meta(t) == F._meta(u), hex(h)
            written = s.uploads.get(h)
            a, b = F._bytes(t), F._bytes(u)
            assert (a == b) if written is None else a[:written] == b[:written], hex(h)
        assert (s.used, s.ops, s.memory.used) == (ref.used, ref.ops, ref.memory.used)
        storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in s.tensors.values()}
        assert s.used == sum(storages.values())
    for n in three.neighbours:
        assert F._bytes(n.tensors[three.neighbour_handle]) == F._bytes(three.kept)


def _slice(three: Any, payload: bytes) -> str:
    """`Three.slice` of raw frame bytes: the three must agree, a frame upb refuses refused by all three alike."""
    import test_runner_fuzz as F
    from gpupool.server import slices

    seen = []
    for k, (ex, s) in enumerate(zip(three.ex, three.s, strict=True)):
        ex.ledger.reset()
        execute = ex.execute if k < 2 else (lambda *a, ex=ex: ex.execute(*a))
        marks: list[int] = []
        req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, payload)
        try:
            res = slices.run_commands(s, execute, ex.ledger, req, F._Clock, marks.append)
        except Exception as exc:  # noqa: BLE001 - a frame that does not parse: the same for all three
            seen.append((type(exc).__name__, str(exc)))
            continue
        err, s.error = s.error, None
        seen.append((res.executed, res.errors, res.used, res.ops, res.handles, marks,
                     None if err is None else (err.code, err.op, err.message)))  # fmt: skip
    assert seen[0] == seen[2], f"native runner vs the plain path: {seen[0]} != {seen[2]}"
    assert seen[1] == seen[2], f"learned Python path vs the plain path: {seen[1]} != {seen[2]}"
    _same(three)
    if isinstance(seen[2][0], str):
        return "slices refused"
    return "slices with errors" if seen[2][6] is not None else "slices clean"


# ---- graph shapes (round 45): the traced graphs `graphs` and `graph-daemon` draw from ----


def _a(v: Any) -> Any:
    """An op argument: an int slot (`("s", k)`), a slot list (`[k, ...]`), an int, a float, a bool, an int list."""
    from gpupool._proto import tensor_pb2

    if isinstance(v, tuple) and v[0] == "s":
        return tensor_pb2.Arg(tensor=v[1])
    if isinstance(v, list):
        return tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=v))
    if isinstance(v, bool):
        return tensor_pb2.Arg(b=v)
    if isinstance(v, int):
        return tensor_pb2.Arg(i=v)
    if isinstance(v, float):
        return tensor_pb2.Arg(f=v)
    return tensor_pb2.Arg(ints=tensor_pb2.IntList(values=list(v[1])))


def _op(name: str, *args: Any, out: tuple[int, ...] = (), kw: dict[str, Any] | None = None) -> Any:
    msg = device_pb2.Op(name=name, args=[_a(a) for a in args], outputs=list(out))
    for k, v in (kw or {}).items():
        msg.kwargs[k].CopyFrom(_a(v))
    return msg


def S(k: int) -> tuple[str, int]:
    return ("s", k)


def INTS(*v: int) -> tuple[str, tuple[int, ...]]:
    return ("ints", v)


class GraphShape:
    """A graph to fuzz with: its inputs (each a tensor sent by value or bound to a handle), persistent tensors,
    ops (slots: inputs 1..n, the persistent tensors next, then the ops' outputs), outputs and kept slots (writes),
    and `ref`: what a run computes from the inputs and the persistent tensors (which it updates in place as the
    graph does), the outputs first, then the kept tensors. `views`: persistent tensor j is a view of persistent
    tensor b, rows `start:end` (`{j: (b, start, end)}`: a client's `w[2:6]` as a persistent handle of its own, an
    alias of `w`'s storage); `write_to`: write k binds persistent handle j (`{k: j}`: a step that hands its new
    weight back under the weight's own handle) rather than a handle of its own."""

    def __init__(self, name: str, inputs: list[tuple[torch.Tensor, bool]], persistent: list[torch.Tensor],
                 ops: list[Any], outputs: list[int], writes: list[int], ref: Any,
                 views: dict[int, tuple[int, int, int]] | None = None,
                 write_to: dict[int, int] | None = None) -> None:  # fmt: skip
        self.name, self.inputs, self.persistent, self.ops = name, inputs, persistent, ops
        self.outputs, self.writes, self.ref = outputs, writes, ref
        self.views, self.write_to = views or {}, write_to or {}

    def values(self) -> list[torch.Tensor]:
        """The persistent tensors' first values, the views views of their bases."""
        out = [t.clone() for t in self.persistent]
        for j, (b, start, end) in self.views.items():
            out[j] = out[b][start:end]
        return out

    def kept_handles(self, persistent: list[int], fresh: Any) -> list[int]:
        return [persistent[self.write_to[k]] if k in self.write_to else fresh() for k in range(len(self.writes))]

    def value(self, i: int, k: int) -> torch.Tensor:
        """Input `i`'s value for run `k` (sent by value; by handle: its upload)."""
        t = self.inputs[i][0]
        if t.dtype == torch.bool:
            return (torch.arange(t.numel()).reshape(t.shape) + k) % 3 == 0
        if t.dtype == torch.int64:
            return (torch.arange(t.numel()).reshape(t.shape) * 7 + k) % max(2, int(t.max()) + 1)
        return t + k * 0.25

    def define(self, gid: int, persistent: list[int], writes: list[int]) -> Any:
        metas = [wire.meta_to_proto(t) for t, _ in self.inputs]
        msg = device_pb2.DefineGraph(graph_id=gid, inputs=len(self.inputs), input_meta=metas, persistent=persistent,
                                     ops=self.ops, outputs=self.outputs)  # fmt: skip
        for slot, h in zip(self.writes, writes, strict=True):
            msg.writes.add(slot=slot, handle=h)
        return msg


def _shapes(n: int = 12) -> list[GraphShape]:
    """The graphs (`n`: the first one's length; 16,370 floats make its lone RunGraph frames ~64 KiB)."""
    f32 = torch.float32
    basic = GraphShape(  # (the graph of round 44: x by value, b by handle, w persistent; x + w kept)
        "basic", [(torch.arange(n, dtype=f32) * 0.25, True), (torch.arange(n, dtype=f32) % 5, False)],
        [torch.full((n,), 0.5)],
        [_op("aten::add.Tensor", S(1), S(3), out=(4,)), _op("aten::mul.Tensor", S(4), 2.0, out=(5,)),
         _op("aten::add.Tensor", S(5), S(2), out=(6,))], [6], [4],
        lambda x, b, w: [(x + w) * 2 + b, x + w])  # fmt: skip

    def views(x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        y = x + w
        return [y.view(24), y.t(), y.t()[1:5:2] * 3, y.t()[1:5:2]]

    views_g = GraphShape(  # outputs that are views of one tensor (and of the kept one): aliases under handles
        "views", [(torch.arange(24, dtype=f32).reshape(4, 6), True)], [torch.arange(6, dtype=f32) * 0.1],
        [_op("aten::add.Tensor", S(1), S(2), out=(3,)), _op("aten::view", S(3), INTS(24), out=(4,)),
         _op("aten::transpose.int", S(3), 0, 1, out=(5,)), _op("aten::slice.Tensor", S(5), 0, 1, 5, 2, out=(6,)),
         _op("aten::mul.Tensor", S(6), 3.0, out=(7,))], [4, 5, 7], [6], views)  # fmt: skip

    def inplace(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> list[torch.Tensor]:
        w.add_(x)
        c.add_(1)
        return [w * c, w.clone(), c.clone()]

    inplace_g = GraphShape(  # persistent tensors updated in place; an output and a kept slot ARE the persistent ones
        "inplace", [(torch.arange(8, dtype=f32), True)], [torch.zeros(8), torch.zeros(1, dtype=torch.int64)],
        [_op("aten::add_.Tensor", S(2), S(1), out=(4,)), _op("aten::add_.Scalar", S(3), 1, out=(5,)),
         _op("aten::mul.Tensor", S(4), S(5), out=(6,))], [6, 4], [5], inplace)  # fmt: skip

    def dtypes(i: torch.Tensor, m: torch.Tensor, x: torch.Tensor, buf: torch.Tensor) -> list[torch.Tensor]:
        torch.neg(x.index_select(0, i), out=buf)
        y = torch.where(m, buf, x.index_select(0, i))
        return [y, y.argmax(1), y.sum([0])]

    def dtypes2(i: torch.Tensor, m: torch.Tensor, x: torch.Tensor, sc: torch.Tensor) -> list[torch.Tensor]:
        a = x.index_select(0, i)
        y = torch.where(m, torch.neg(a), a) * sc
        return [y, y.argmax(1), y.sum([0])]

    dtypes2_g = GraphShape(  # the same with an out= op into the graph's own zeros: a plan (the other has none)
        "dtypes", [(torch.tensor([0, 3, 9, 3, 1]), True), (torch.ones(5, 1, dtype=torch.bool), False),
                   (torch.arange(30, dtype=f32).reshape(10, 3), False)], [torch.tensor([1.0, -2.0, 0.5])],
        [_op("aten::index_select", S(3), 0, S(1), out=(5,)), _op("aten::zeros_like", S(5), out=(6,)),
         _op("aten::neg.out", S(5), kw={"out": S(6)}), _op("aten::where.self", S(2), S(6), S(5), out=(7,)),
         _op("aten::mul.Tensor", S(7), S(4), out=(8,)), _op("aten::argmax", S(8), 1, out=(9,)),
         _op("aten::sum.dim_IntList", S(8), INTS(0), out=(10,))], [8, 9, 10], [], dtypes2)  # fmt: skip

    dtypes_g = GraphShape(  # int64 by value, bool by handle, an out= op into a persistent tensor (no C++ plan: the
        "outpersist",  # graph's own op may reshape a persistent tensor, `Graph.unstable`)
        [(torch.tensor([0, 3, 9, 3, 1]), True), (torch.ones(5, 1, dtype=torch.bool), False),
         (torch.arange(30, dtype=f32).reshape(10, 3), False)], [torch.zeros(5, 3)],
        [_op("aten::index_select", S(3), 0, S(1), out=(5,)), _op("aten::neg.out", S(5), kw={"out": S(4)}),
         _op("aten::where.self", S(2), S(4), S(5), out=(6,)), _op("aten::argmax", S(6), 1, out=(7,)),
         _op("aten::sum.dim_IntList", S(6), INTS(0), out=(8,))], [6, 7, 8], [], dtypes)  # fmt: skip

    def lists(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> list[torch.Tensor]:
        a, b, c = torch.cat([x, y]).split(4)
        a2, b2, c2 = torch._foreach_mul([a, b, c], 2.0)
        return [torch.stack([a2, c2]), b2 + s, b, c]

    lists_g = GraphShape(  # tensor lists in and out (cat, split, _foreach_mul, stack): five slots from two ops
        "lists", [(torch.arange(24, dtype=f32).reshape(6, 4), True), (-torch.arange(24, dtype=f32).reshape(6, 4),
                                                                       True)], [torch.ones(4)],
        [_op("aten::cat", [1, 2], out=(4,)), _op("aten::split.Tensor", S(4), 4, out=(5, 6, 7)),
         _op("aten::_foreach_mul.Scalar", [5, 6, 7], 2.0, out=(8, 9, 10)), _op("aten::stack", [8, 10], out=(11,)),
         _op("aten::add.Tensor", S(9), S(3), out=(12,))], [11, 12, 6], [7], lists)  # fmt: skip

    def second(b: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        p = b.mm(x)
        return [torch.addmm(w, p, x), p]

    second_g = GraphShape(  # the second input by value, the first by handle (input_data[1] holds its bytes)
        "second", [(torch.eye(3), False), (torch.arange(9, dtype=f32).reshape(3, 3), True)], [torch.ones(3, 3)],
        [_op("aten::mm", S(1), S(2), out=(4,)), _op("aten::addmm", S(3), S(4), S(2), out=(5,))], [5], [4],
        second)  # fmt: skip

    def writeback(x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        new = w + x
        w.copy_(new)  # (the graph binds w's handle to its new tensor: what the next run reads)
        return [new * 2, new.clone()]

    writeback_g = GraphShape(  # a write whose handle is the graph's own persistent tensor's
        "writeback", [(torch.arange(6, dtype=f32), True)], [torch.zeros(6)],
        [_op("aten::add.Tensor", S(1), S(2), out=(3,)), _op("aten::mul.Tensor", S(3), 2.0, out=(4,))], [4], [3],
        writeback, write_to={0: 0})  # fmt: skip

    def aliased(x: torch.Tensor, w: torch.Tensor, wv: torch.Tensor) -> list[torch.Tensor]:
        wv.add_(x)
        return [w * 2, wv.clone()]

    aliased_g = GraphShape(  # two persistent tensors of one storage (w and its view w[2:6]); one written in place,
        "aliased", [(torch.arange(4, dtype=f32), True)], [torch.arange(8, dtype=f32), torch.zeros(4)],  # the
        [_op("aten::add_.Tensor", S(3), S(1), out=(4,)), _op("aten::mul.Tensor", S(2), 2.0, out=(5,))],  # other
        [5, 4], [], aliased, views={1: (0, 2, 6)})  # read; an output IS the view  # fmt: skip
    return [basic, views_g, inplace_g, dtypes_g, dtypes2_g, lists_g, second_g, writeback_g, aliased_g]


class ShapeTwin:
    """tests/unit/test_server_graph_quick.py's `Twin` of any `GraphShape`: a session (fake GPU), its executor (as in
    a session's worker: `exclusive_rng`, the graph traced) and the graph `GID` defined on it, its persistent tensors
    and by-handle inputs bound, its runs' outputs fresh handles; `quick` False: the graph's runs never take the C++
    plan (`g.fast`), the reference."""

    def __init__(self, shape: GraphShape, quick: bool) -> None:
        from gpupool.server import slices
        from gpupool.server.devices import FakeDevice
        from gpupool.server.executor import CommandExecutor
        from gpupool.server.sessions import DeviceMemory, WorkerSession

        dev = FakeDevice(0, "h", 1 << 30)
        self.s = s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
        self.ex = CommandExecutor(slices.SliceLedger())
        self.ex.exclusive_rng = True
        self.shape, self.base = shape, s.handle_base
        self.persistent = [self.base + 1 + k for k in range(len(shape.persistent))]
        fresh = iter(range(self.base + 0x200, self.base + 0x300))
        self.kept = shape.kept_handles(self.persistent, lambda: next(fresh))
        self.inputs = [0 if by_value else self.base + 0x100 + i for i, (_, by_value) in enumerate(shape.inputs)]
        for h, t in zip(self.persistent, shape.values(), strict=True):
            s.bind(h, t)
        for i, h in enumerate(self.inputs):
            if h:
                s.bind(h, shape.value(i, 0))
        self.ex.execute(s, device_pb2.Command(define_graph=shape.define(GID, self.persistent, self.kept)), _unanswered)
        assert s.error is None, (shape.name, s.error)
        self.g = self.ex.graphs._of(s)[GID]
        if not quick:
            self.g.fast = False
        self.next = 0x1000

    def data(self, k: int) -> list[bytes]:
        """Run `k`'s input_data: the by-value inputs' bytes, empty for the others."""
        return [self.shape.value(i, k).numpy().tobytes() if not h else b"" for i, h in enumerate(self.inputs)]

    def body(self, gid: int = 0) -> bytes:
        """A RunGraph that runs (of graph `gid`, GID by default): its inputs, fresh outputs."""
        self.next += 1
        outs = [self.base + self.next + 0x100000 * j for j in range(len(self.shape.outputs))]
        return device_pb2.RunGraph(graph_id=gid or GID, inputs=self.inputs, outputs=outs,
                                   input_data=self.data(self.next)).SerializeToString()  # fmt: skip

    def second(self) -> None:
        """(secrev51) Graph GID2 of the twin's shape defined beside GID (its own kept handles; the slow twin's
        without a plan too): a session of two graphs, whose runs hand the one plan that keeps its inputs sent by
        value for its next run from graph to graph (server/graph.py `_spares`, `GraphPlan.let_go`)."""
        fresh = iter(range(self.base + 0x300, self.base + 0x400))
        kept = self.shape.kept_handles(self.persistent, lambda: next(fresh))
        msg = device_pb2.Command(define_graph=self.shape.define(GID2, self.persistent, kept))
        self.ex.execute(self.s, msg, _unanswered)
        assert self.s.error is None, (self.shape.name, self.s.error)
        if self.g.fast is False:
            self.ex.graphs._of(self.s)[GID2].fast = False

    def spares(self) -> str:
        """(secrev51) At most one of the session's plans keeps inputs (`GraphPlan.spares`), and that one is the
        session's `spare_plan`: their memory is one graph's reservation, the largest graph's the count holds.
        Which graph's plan keeps them, for the counts."""
        graphs = self.ex.graphs._of(self.s)
        holders = [gid for gid, g in graphs.items() if g.fast and g.fast.spares]
        assert len(holders) <= 1 and all(graphs[h].fast is self.s.spare_plan for h in holders), (holders, self.s)
        return f"inputs kept by graph {holders[0]}" if holders else "no inputs kept"

    def state(self) -> tuple[Any, ...]:
        """What `Twin.state` says of a twin (its session's tensors, poisons, storages, counts; the graph's runs)."""
        return _quick_tests().Twin.state(self)  # type: ignore[no-any-return]


GID = 1  # the twins' graph id
GID2 = 2  # (secrev51) their second graph's (`ShapeTwin.second`)


def _quick_tests() -> Any:
    """tests/unit/test_server_graph_quick.py (its `Twin`, `_slice`, `_same`), imported once."""
    if "test_server_graph_quick" not in sys.modules:
        sys.path.insert(0, str(ROOT / "tests" / "unit"))
    import test_server_graph_quick as Q

    return Q


def _unanswered(item: object) -> None:
    raise AssertionError("graph commands are not answered")


# ---- graphs: RunGraph bytes (`native_runner.graph_frame`, `GraphPlan.run_raw`), side frames ----


class GraphGen:
    """Seeded RunGraph messages and frames for a graph `gid` whose runs take `inputs` (0: sent by value, its bytes
    in `data` at the same place; else a handle) and `n_out` outputs (round 45: any `GraphShape`; round 44's graph
    had two inputs, x by value and b by handle, and one output): a third that run, the rest damaged field by field
    (graph ids of other graphs and of another session's, another session's handles, persistent and kept handles as
    outputs, `drop_writes`, `graph_id` repeated, unknown fields, other wire types, truncated and overlong varints,
    lengths past the end, huge packed and unpacked counts, input data of other sizes) and at the byte level; frames
    of one RunGraph (what the worker runs from its bytes, round 43) with lengths overlong now and then, of several,
    of 2 to 5 mixing runs, ones the C++ plan declines and damaged ones (`mixed`, round 44), of a DropGraph among
    runs, and of 64 KiB - 1, 64 KiB and 64 KiB + 1 bytes (the front's `split_frame` copies a frame's spans up to 64
    KiB, views past it; a side socket reads frames from 64 KiB into buffers it reuses)."""

    def __init__(self, rng: random.Random, gid: int, base: int, inputs: list[int], data: list[bytes], n_out: int,
                 owned: list[int], foreign: list[int], other_gids: list[int]) -> None:  # fmt: skip
        self.rng, self.gid, self.base, self.inputs, self.data, self.n_out = rng, gid, base, inputs, data, n_out
        self.owned, self.foreign, self.other_gids = owned, foreign, other_gids
        self.next = 0x10000

    def fresh(self) -> int:
        self.next += 1
        return self.base + self.next

    def vi(self, v: int) -> bytes:
        return varint(v, self.rng.choice([0] * 10 + [1, 2, 5]))

    def handle(self) -> int:
        r = self.rng
        return r.choice([0, 0, *[h for h in self.inputs if h], *self.owned, self.fresh(), r.choice(self.foreign or [5]),
                         U64, 1 << 63,
                         self.base, self.base + (1 << 32) - 1, r.getrandbits(64)])  # fmt: skip

    def runs(self, inputs: list[int] | None = None, outs: list[int] | None = None) -> bytes:
        """A RunGraph's fields past its graph_id: these inputs (default its own), these outputs (default fresh
        ones), the inputs' bytes (the by-value ones; empty for the others)."""
        inputs = self.inputs if inputs is None else inputs
        outs = [self.fresh() for _ in range(self.n_out)] if outs is None else outs
        body = ld(2, b"".join(varint(h) for h in inputs)) + ld(3, b"".join(varint(h) for h in outs))
        return body + b"".join(ld(10, d) for d in self.data)

    def good(self, out: int | None = None, pad: int = 0) -> bytes:
        """A RunGraph that runs (its inputs by value and by handle, fresh outputs: the first `out` where given),
        `pad` bytes longer (`graph_id` written again first, overlong: upb reads the last one)."""
        outs = [self.fresh() if out is None else out] + [self.fresh() for _ in range(self.n_out - 1)]
        head = b""
        while pad > 1:  # pieces of 2 to 10 bytes (a gid under 128)
            piece = min(pad, 10) - (pad - min(pad, 10) == 1)
            head += key(1, 0) + varint(self.gid, piece - 2)
            pad -= piece
        return head + key(1, 0) + varint(self.gid) + self.runs(outs=outs)

    def body(self) -> bytes:
        r = self.rng
        if r.random() < 0.3:
            return self.good(r.choice([None, None, None, 0, *self.owned, r.choice(self.foreign or [5])]))
        fields = [key(1, 0) + self.vi(r.choice([self.gid] * 4 + self.other_gids + [0, U64]))]
        for _ in range(r.randrange(1, 6)):
            k = r.random()
            if k < 0.35:  # inputs / outputs, one or packed
                f = r.choice([2, 3])
                if r.random() < 0.5:
                    fields.append(key(f, 0) + self.vi(self.handle()))
                else:
                    fields.append(ld(f, b"".join(self.vi(self.handle()) for _ in range(r.randrange(4)))))
            elif k < 0.6:
                one = r.choice(self.data)
                d = r.choice([one, one, b"", one[:-1], one + b"\0", bytes(r.randrange(100))])
                fields.append(ld(10, d))
            elif k < 0.65:
                fields.append(key(4, 0) + self.vi(self.handle()))  # drop_writes
            elif k < 0.7:
                fields.append(key(1, 0) + self.vi(r.choice([self.gid, *self.other_gids])))  # graph_id again
            elif k < 0.75:  # a huge count: a packed field of zeros, or many unpacked
                n = r.choice([300, 5000, 40000])
                fields.append(ld(r.choice([2, 3]), b"\0" * n) if r.random() < 0.5 else (key(2, 0) + b"\0") * n)
            elif k < 0.8:  # another wire type for a known field, an unknown field
                fields.append(key(r.choice([1, 2, 3, 4, 10, 11, 99]), r.choice([0, 1, 2, 5])) + b"\x03abc" + bytes(8))
            elif k < 0.85:  # a truncated varint, an 11-byte one, a 10th byte > 1
                fields.append(key(r.choice([1, 2, 3]), 0) + r.choice([b"\xff" * r.randrange(1, 10), b"\xff" * 10 +
                                                                      b"\x01", b"\xff" * 9 + b"\x02"]))  # fmt: skip
            elif k < 0.9:  # a length past the end, or into a packed field's last varint
                fields.append(key(r.choice([2, 3, 10]), 2) + varint(r.choice([1, 100, 1 << 31, U64])) + b"\x81")
            else:
                fields.append(
                    r.choice([ld(2, b""), b"\x00", key(0, 0) + b"\x01", varint(1 << 3, 3) + varint(self.gid)])
                )
        if r.random() < 0.7:  # what it needs to run, among the rest (its inputs' bytes in their order)
            fields += [ld(2, b"".join(varint(h) for h in self.inputs)),
                       ld(3, b"".join(varint(self.fresh()) for _ in range(r.randrange(self.n_out + 1)))),
                       b"".join(ld(10, d) for d in self.data)]  # fmt: skip
        r.shuffle(fields)
        body = b"".join(fields)
        if r.random() < 0.15:
            body = Gen(r, self.base >> 32).bytes_damage(body)
        return body

    def command(self, body: bytes, extra: int = 0) -> bytes:
        """A `Command` whose `run_graph` (field 21: key aa 01) holds `body`."""
        return b"\xaa\x01" + varint(len(body), extra) + body

    def frame(self) -> tuple[str, bytes]:
        """(what kind of frame, its bytes)."""
        r = self.rng
        how = r.random()
        if how < 0.6:
            cmd = self.command(self.body(), r.choice([0] * 12 + [1, 3]))
            frame = b"\x0a" + varint(len(cmd), r.choice([0] * 12 + [1, 4])) + cmd
            if r.random() < 0.05:
                frame += r.choice([b"\x00", b"\x0a", b"\x0a\x05", b"\x0a\x00"])  # trailing bytes
            return "lone", frame
        if how < 0.75:  # a DropGraph among runs (or of another session's graph id): the run after it finds none
            gid = self.gid if r.random() < 0.7 else r.choice(self.other_gids or [9])
            cmds = [self.command(self.good()), ld(20, key(1, 0) + varint(gid)), self.command(self.good())]
            return "drop", frame_of(cmds[: r.randrange(2, 4)])
        if how < 0.8:
            return "several", frame_of([self.command(self.body()) for _ in range(r.randrange(2, 5))])
        if how < 0.9:  # (round 44, fuzzrev44: a frame of RunGraphs runs from its bytes, `graph_frame`)
            return "mixed", self.mixed()
        return "64k", self.sized(r.choice([65535, 65536, 65537]))

    def mixed(self) -> bytes:
        """A frame of 2 to 5 RunGraphs, each one that runs, one the C++ plan declines (`drop_writes`, another
        graph's id or another session's, another session's handle as an input or an output: parsed and run or
        refused by the Python path) or a damaged one, in any order."""
        r = self.rng
        cmds = []
        for _ in range(r.randrange(2, 6)):
            k = r.random()
            if k < 0.35:
                body = self.good()
            elif k < 0.75:
                body = self.declined()
            else:
                body = self.body()
            cmds.append(self.command(body))
        return frame_of(cmds)

    def declined(self) -> bytes:
        r = self.rng
        gid = self.gid
        inputs, outs = list(self.inputs), [self.fresh() for _ in range(self.n_out)]
        c = r.randrange(4)
        if c == 1:
            gid = r.choice(self.other_gids or [9])
        elif c == 2:
            inputs[r.randrange(len(inputs))] = r.choice(self.foreign or [5])
        elif c == 3:
            outs[r.randrange(len(outs))] = r.choice(self.foreign or [5])
        body = key(1, 0) + varint(gid) + self.runs(inputs, outs)
        if c == 0:
            body += key(4, 0) + varint(r.choice([0, 1, *self.owned]))  # drop_writes
        return body

    def sized(self, size: int) -> bytes:
        """A frame of exactly `size` bytes: one good RunGraph padded inside (a lone frame, where its input is about
        that large), else an Upload of a fresh uint8 handle before it."""
        out = self.fresh()
        lone = frame_of([self.command(self.good(out))])
        if 0 <= size - len(lone) <= 400:
            got = frame_of([self.command(self.good(out, size - len(lone)))])
            if len(got) == size:
                return got
        for n in range(max(0, size - len(lone) - 40), size - len(lone)):
            up = device_pb2.Command(upload=device_pb2.Upload(handle=self.fresh(), data=bytes(n), last=True))
            up.upload.meta.dtype, up.upload.meta.shape[:] = wire.dtype_to_proto(torch.uint8), [n]
            got = frame_of([up.SerializeToString()]) + lone
            if len(got) == size:
                return got
        raise AssertionError(f"no frame of {size} bytes")


def _counted(run_raw: Any, counts: Counter[str]) -> Any:
    def run(s: Any, raw: bytes, *rest: Any) -> int:  # (round 44: `GraphTable.run_raw(s, raw, graph_id)`)
        try:
            done = run_raw(s, raw, *rest)
        except Exception:
            counts["raw runs that raised"] += 1
            raise
        # (round 48, slice48: -1 declined, 0 ran, 1 + ops ran quiet; the re-quieting runs among the runs)
        counts["raw runs" if done >= 0 else "raw declined"] += 1
        return done  # type: ignore[no-any-return]

    return run


def graphs(args: argparse.Namespace, mod: Any) -> Counter[str]:
    """In-process: `GraphGen`'s frames run by twin sessions of one traced graph (tests/unit/test_server_graph_quick.py
    `Twin`): one whose quiet runs take the C++ plan (a frame of RunGraphs: `graph_frame`, `run_raw` of its
    bytes), one without a plan (upb's parse, `graph._run`); after every frame both say the same (slice results,
    error, tensors, poisons, storages, counts) and the front's readers agree on the frame (`check_frame`)."""
    Q = _quick_tests()
    counts: Counter[str] = Counter()
    twins: tuple[Any, Any] | None = None
    shapes = _shapes()
    for n, seed, r in _seeded_inputs(args):
        counts["inputs"] += 1
        try:
            if twins is None or r.random() < 0.02:
                shape = r.choice(shapes)  # (round 45: one of several graphs; round 44's was `basic`)
                twins = ShapeTwin(shape, True), ShapeTwin(shape, False)
                table = twins[0].ex.graphs
                table.run_raw = _counted(table.run_raw, counts)  # type: ignore[method-assign]
                for _ in range(5):  # traced and quiet: the plan's runs
                    assert Q._same(*twins, lambda t: Q._slice(t, Q._frame_of(t.body())))[1] is None, shape.name
                if r.random() < 0.5:  # (secrev51) a second graph, its runs among the first's (`_spares`)
                    for t in twins:
                        t.second()
            quick, slow = twins
            counts["shape:" + quick.shape.name] += 1
            owned = [*quick.persistent, *quick.kept, *(h for h in quick.inputs if h)]
            gen = GraphGen(r, GID, quick.base, quick.inputs, quick.data(3), len(quick.shape.outputs), owned,
                           [(9 << 32) + 1], [2, 7])  # fmt: skip
            kind, payload = gen.frame()  # (the twins' handles are the same numbers)
            counts["frame:" + check_frame(mod, payload)] += 1
            got = Q._same(quick, slow, lambda t, p=payload: Q._slice(t, p))
            counts[
                f"{kind}:" + ("refused" if got[0][0] in ("DecodeError", "malformed") else "error" if got[1] else "ran")
            ] += 1
            counts[quick.spares()] += 1
            if GID2 in quick.ex.graphs._of(quick.s) and r.random() < 0.3:
                _second_runs(Q, r, quick, slow, counts)
            if kind == "drop" and GID not in quick.ex.graphs._of(quick.s):
                twins = None
            elif Q._same(quick, slow, lambda t: Q._slice(t, Q._frame_of(t.body())))[1] is not None:
                twins = None  # (an input poisoned, a persistent tensor rebound to another shape): afresh
            # else quiet again: the next frame may take the plan
        except Exception:
            print(f"FAILED: --seed {args.seed} input {n} (its own seed {seed})", file=sys.stderr)
            raise
    return counts


def _second_runs(Q: Any, r: random.Random, quick: Any, slow: Any, counts: Counter[str]) -> None:
    """(secrev51) Runs of the twins' second graph (`ShapeTwin.second`) after a frame of the first's: twice on their
    own (its second run quiet: its plan keeps its inputs), in one frame with the first's (which, no longer quiet,
    replays in Python: `_spares(s, None)`), once; or once and dropped (its plan's inputs let go with it); both twins
    the same after each frame, at most one plan of the session keeping inputs."""
    how = r.randrange(4)
    if how == 0:
        frames = [lambda t: Q._frame_of(t.body(GID2)) for _ in range(2)]
    elif how == 1:
        frames = [lambda t: Q._frame_of(t.body(GID2)) + Q._frame_of(t.body()) + Q._frame_of(t.body(GID2))]
    elif how == 2:
        frames = [lambda t: Q._frame_of(t.body(GID2))]
    else:
        drop = device_pb2.Command(drop_graph=device_pb2.DropGraph(graph_id=GID2)).SerializeToString()
        frames = [lambda t: Q._frame_of(t.body(GID2)), lambda t: b"\x0a" + varint(len(drop)) + drop]
    for frame in frames:
        Q._same(quick, slow, lambda t, f=frame: Q._slice(t, f(t)))
        counts[quick.spares()] += 1
    counts[f"second graph:{how}"] += 1


# ---- attention: the fused attention's C++ compositions (native_runner.cpp `attn::run`, round 45) ----

_ATT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ATT_FLAGS = ([True, True, True, False], [True, True, True, True], [False, True, False, False], [True, True, True])


def _contiguous(shape: list[int]) -> list[int]:
    strides, stride = [], 1
    for size in reversed(shape):
        strides.append(stride)
        stride *= max(size, 1)
    return strides[::-1]


def _att_view(r: random.Random, base: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A view of `base` (a flat tensor) of `shape` as a client's views can lay it out: contiguous, transposed,
    expanded (stride 0), overlapping (strides smaller than the sizes'), at an offset; within `base`'s elements (a
    tensor of its own where it would not fit)."""
    kind = r.choice(["contiguous", "transposed", "expanded", "overlapping", "offset"])
    strides = _contiguous(shape)
    if kind == "transposed" and len(shape) >= 2:
        swapped = _contiguous([*shape[:-2], shape[-1], shape[-2]])
        strides = [*swapped[:-2], swapped[-1], swapped[-2]]
    elif kind == "expanded":
        strides = [0 if r.random() < 0.5 else s for s in strides]
    elif kind == "overlapping":
        strides = [r.randint(0, 2) for _ in shape]
    offset = r.randint(0, 3) if kind == "offset" else 0
    reach = offset + (0 if 0 in shape else sum((size - 1) * st for size, st in zip(shape, strides, strict=True)) + 1)
    if reach > base.numel():
        return torch.randn(shape, generator=torch.Generator().manual_seed(r.getrandbits(31))).to(base.dtype)
    return base.as_strided(shape, strides, offset)


def _att_same(a: Any, b: Any) -> bool:
    """The same value: tensors of one dtype, shape, strides and offset with the same bits (NaNs too)."""
    if a is None or b is None:
        return a is None and b is None
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return bool(a == b) and type(a) is type(b)
    if (a.dtype, a.shape, a.stride(), a.storage_offset()) != (b.dtype, b.shape, b.stride(), b.storage_offset()):
        return False
    try:
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    except AssertionError:
        return False
    return True


def _att_storage(t: torch.Tensor) -> torch.Tensor:
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),), (1,)).clone()


def _att_call(f: Any) -> tuple[str, Any]:
    try:
        return "ok", f()
    except Exception as exc:  # (the Python run's InvalidArgument, torch's RuntimeError: compared by kind below)
        return type(exc).__name__, exc


def _att_seed(r: random.Random, right: Any, q: torch.Tensor, k: torch.Tensor, alias: torch.Tensor) -> tuple[str, Any]:
    """A backward's philox_seed: the forward's, or a hostile one (forged bytes of the right size, the state alone,
    a size off by 8, at an offset, another dtype or dim, or one whose storage also holds the query: `alias` is then
    set to the query's values in it)."""
    from gpupool.server import attention

    head = attention._state_bytes(q.device)
    _, _, extra = attention._saved_sizes(q, k)
    size = head + extra
    g = torch.Generator().manual_seed(r.getrandbits(31))
    kind = r.choice(["forward", "forward", "forged", "state", "short", "long", "offset", "float", "1-d", "inputs"])
    if kind == "forward" and isinstance(right, torch.Tensor):
        return kind, right
    if kind == "forged" or kind == "forward":
        raw = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)
        return "forged", raw.view(torch.int64).as_strided([], [], 0)
    if kind == "state":
        return kind, torch.get_rng_state().view(torch.int64).as_strided([], [], 0).clone()
    if kind in ("short", "long"):
        raw = torch.zeros(size + (8 if kind == "long" else -8), dtype=torch.uint8)
        return kind, raw.view(torch.int64).as_strided([], [], 0)
    if kind == "offset":
        return kind, torch.zeros(size // 8 + 1, dtype=torch.int64).as_strided([], [], 1)
    if kind == "float":
        return kind, torch.zeros(size // 8, dtype=torch.float64).as_strided([], [], 0)
    if kind == "1-d":
        return kind, torch.zeros(size // 8, dtype=torch.int64)
    # the query's own storage (a copy of its values at its start, exactly the seed's size) read as the saved softmax
    # and mask: the seed and an input of the backward alias
    buf = torch.zeros(size, dtype=torch.uint8)
    if q.numel() * q.element_size() <= size and q.element_size() <= head:
        buf[: q.numel() * q.element_size()].view(q.dtype).copy_(q.reshape(-1))
        alias.set_(buf.view(q.dtype).untyped_storage(), 0, (q.numel(),), (1,))  # the caller's query: this one
    return kind, torch.empty(0, dtype=torch.int64).set_(buf.untyped_storage(), 0, [], [])


def attention_fuzz(args: argparse.Namespace, mod: Any) -> Counter[str]:
    """In-process (round 46): the fused attention's eager dropout compositions in C++ (`attention_forward`,
    `attention_backward`: `attn::run`'s calls) against the Python run they stand in for (server/attention.py
    `fused_attention`, `fused_attention_backward`) on hostile calls: dtypes (mixed too), 4-D and other shapes with
    zero sizes, query, key, value, grad_out and out as views of one storage (expanded, overlapping, transposed, at
    offsets), biases that do and do not broadcast, dropout and scale out of range, grad_input_mask of 3 and 4, and
    backward seeds that are the forward's, forged bytes of the right size, the state alone, a size off by 8, at an
    offset, of another dtype or dim, or the inputs' own storage. The C++ call must decline (None, the generator
    untouched) or give the Python run's values bit for bit (its kept storage and the generator after it too); where
    it raises the Python run must raise too; where the Python run refuses (InvalidArgument) it must decline."""
    from gpupool.server import attention

    counts: Counter[str] = Counter()
    for n, seed, r in _seeded_inputs(args):
        try:
            counts.update(_attention_case(r, mod, attention))
        except Exception:
            print(f"FAILED: --seed {args.seed} input {n} (its own seed {seed})", file=sys.stderr)
            raise
        counts["inputs"] += 1
    return counts


def _seeded_inputs(args: argparse.Namespace) -> Iterator[tuple[int, int, random.Random]]:
    """Each input of a run as (its number, its own seed, a Random of that seed): drawn from `--seed` until
    `--seconds` or `--inputs`, the first `--skip` passed over (a failure's number reproduces it)."""
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < deadline and (args.inputs == 0 or n < args.inputs):
        n += 1
        seed = rng.getrandbits(64)
        if n > args.skip:
            yield n, seed, random.Random(seed)


def _attention_case(r: random.Random, mod: Any, attention: Any) -> list[str]:
    """One forward (and, where the Python run's succeeded, one backward from its outputs): what each did."""
    dtype = r.choice(_ATT_DTYPES)
    b, h, length, source, e, ev = (r.choice([1, 1, 2, 3]) for _ in range(6))
    if r.random() < 0.1:
        b, h, length, source, e, ev = (r.choice([0, 1, 2]) for _ in range(6))
    g = torch.Generator().manual_seed(r.getrandbits(31))
    base = torch.randn(r.randint(1, 400), generator=g).to(dtype)
    if r.random() < 0.05:
        base[r.randrange(base.numel())] = r.choice([float("inf"), float("nan"), -float("inf")])
    shapes = {"q": [b, h, length, e], "k": [b, h, source, e], "v": [b, h, source, ev]}
    if r.random() < 0.1:  # a shape the validators refuse
        which = r.choice(list(shapes))
        shapes[which] = r.choice([shapes[which][1:], [*shapes[which], 1], [x + 1 for x in shapes[which]]])
    q, k, v = (_att_view(r, base, shapes[x]) for x in ("q", "k", "v"))
    if r.random() < 0.05:
        k = k.to(r.choice(_ATT_DTYPES))
    bias: torch.Tensor | None = None
    if r.random() < 0.5:
        bshape = [b, h, length, source][-r.randint(1, 4) :]
        bshape = [x if r.random() < 0.7 else r.choice([1, x + 1]) for x in bshape]
        bdtype = r.choice([torch.bool, dtype, dtype, torch.int64])
        bias = _att_view(r, torch.randn(200, generator=g).to(dtype), bshape)
        bias = bias > 0 if bdtype is torch.bool else bias.to(bdtype)
    p = r.choice([0.1, 0.3, 0.5, 0.9, 0.0, 1.0, -0.1, float("nan")])
    scale = r.choice([None, None, 0.5, -0.4, 0.0, 2.0, float("inf")])
    causal = r.random() < 0.3

    # the CPU generator alone (the calls draw from it; get/set_rng_state below are its state): torch.manual_seed
    # also queues lazy CUDA/XPU/MTIA seeds, each with a formatted stack, a sixth of this mode's time on 2 cores
    torch.default_generator.manual_seed(r.getrandbits(31))
    before = torch.get_rng_state()
    py = _att_call(lambda: attention.fused_attention(q, k, v, bias, p, causal, False, scale=scale))
    py_after = torch.get_rng_state()
    torch.set_rng_state(before)
    cpp = _att_call(lambda: mod.attention_forward(q, k, v, bias, p, causal, False, scale))
    where = f"forward {dtype} {shapes} bias {None if bias is None else (bias.dtype, list(bias.shape))} p {p}"
    if cpp[0] != "ok":
        assert py[0] != "ok", f"{where}: C++ raised {cpp[1]!r}, the Python run did not"
        return ["forward:both raised"]
    if cpp[1] is None:
        assert torch.equal(torch.get_rng_state(), before), f"{where}: declined after a draw"
        if py[0] != "ok":
            return ["forward:declined, refused"]
        outcome = "forward:declined"
    else:
        assert py[0] == "ok", f"{where}: C++ ran a call the Python run refuses: {py[1]!r}"
        assert torch.equal(torch.get_rng_state(), py_after), f"{where}: another generator state after"
        assert len(py[1]) == len(cpp[1]) == 9
        for a, c in zip(py[1], cpp[1], strict=True):
            assert _att_same(a, c), f"{where}: another output"
        assert torch.equal(_att_storage(py[1][6]), _att_storage(cpp[1][6])), f"{where}: another kept storage"
        outcome = "forward:ran"
    if py[0] != "ok":
        return [outcome]

    # the backward: from the forward's outputs (some of them swapped for hostile ones)
    fwd = py[1]
    shape = [b, h, length, ev]
    grad = _att_view(r, base, shape if r.random() < 0.9 else [b, h, length, ev + 1])
    out = fwd[0] if r.random() < 0.8 else _att_view(r, base, shape)
    lse, lse_kind = _att_lse(r, fwd[1], [b, h, length])
    flags = list(r.choice(_ATT_FLAGS))
    alias = torch.empty(0, dtype=dtype)
    kind, philox = _att_seed(r, fwd[6], q, k, alias)
    if alias.numel():
        q = alias.view(q.shape)
    bp = p if r.random() < 0.9 else r.choice([0.0, 0.7, 1.0])
    before = torch.get_rng_state()
    py = _att_call(lambda: attention.fused_attention_backward(
        grad, q, k, v, bias, flags, out, lse, None, None, fwd[4], fwd[5], bp, causal, philox, fwd[7], scale=scale
    ))  # fmt: skip
    cpp = _att_call(lambda: mod.attention_backward(grad, q, k, v, bias, flags, out, lse, bp, causal, philox, scale))
    assert torch.equal(torch.get_rng_state(), before), "a backward drew"
    where = f"backward ({where}) seed {kind} flags {flags} p {bp} logsumexp {lse_kind}"
    if bp == 0:  # no dropout: neither side reads the seed, and C++ runs the kernels' path (attn46): its own bucket
        kind = f"{kind}, p 0"
    lse_bucket = f"logsumexp {lse_kind}{', p 0' if bp == 0 else ''}"
    if cpp[0] != "ok":
        assert py[0] != "ok", f"{where}: C++ raised {cpp[1]!r}, the Python run did not"
        return [outcome, f"backward {kind}:both raised", f"{lse_bucket}:both raised"]
    if cpp[1] is None:
        said = ":declined" + (", refused" if py[0] != "ok" else "")
        return [outcome, f"backward {kind}{said}", f"{lse_bucket}{said}"]
    assert py[0] == "ok", f"{where}: C++ ran a call the Python run refuses: {py[1]!r}"
    for a, c in zip(py[1], cpp[1], strict=True):
        assert _att_same(a, c), f"{where}: another gradient"
    return [outcome, f"backward {kind}:ran", f"{lse_bucket}:ran"]


def _att_lse(r: random.Random, right: torch.Tensor, shape: list[int]) -> tuple[torch.Tensor, str]:
    """A backward's logsumexp (round 47): the forward's, or a hostile one the kernels' path (dropout_p 0, attn46)
    reads as it is: one row longer, forged values (infinities and NaNs among them) laid out expanded, overlapping,
    transposed or at an offset in a larger storage, another dtype (float64, float16), or one dim short."""
    kind = r.choice(["forward"] * 6 + ["long", "forged", "float64", "float16", "2-d"])
    g = torch.Generator().manual_seed(r.getrandbits(31))
    if kind == "forward":
        return right, kind
    if kind == "long":
        return torch.zeros(shape[0], shape[1], shape[2] + 1), kind
    if kind == "2-d":
        return torch.zeros(shape[1:]), kind
    base = torch.randn(r.randint(1, 64), generator=g) * r.choice([1.0, 100.0])
    if r.random() < 0.2:
        base[r.randrange(base.numel())] = r.choice([float("inf"), float("nan"), -float("inf")])
    forged = _att_view(r, base, shape)
    if kind == "forged":
        return forged, kind
    return forged.to(torch.float64 if kind == "float64" else torch.float16), kind


# ---- daemon: a hostile session's damaged streams through a live daemon, a neighbour checked ----


def _serve(args: argparse.Namespace, prefix: str, *flags: str) -> tuple[Path, Any, str, Any]:
    """A `gpupool serve` on loopback with a fake GPU (and `flags`, then `--daemon-flag`s): (its folder, process,
    address, DaemonHandle)."""
    import secrets
    import tempfile

    from support import DaemonHandle, has_pki, install_test_tls, start_serve_process

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    if not has_pki():  # (under pytest the session's test CA stays: `_stop` removes this folder)
        install_test_tls(tmp / "pki")  # the tests' CA: the daemon serves TLS with it, this process is its operator
    key = secrets.token_hex(32).encode()
    (tmp / "token.key").write_bytes(key + b"\n")
    proc, address = start_serve_process(tmp / "token.key", "--fake-gpus", "1", "--fake-gpu-memory", "64GiB", *flags,
                                        *args.daemon_flag)  # fmt: skip
    return tmp, proc, address, DaemonHandle(address, key, "test-host", process=proc)


def _stop(proc: Any, tmp: Path) -> None:
    """Stop the daemon, remove its folder; it must exit 0."""
    import shutil

    from support import stop_process

    code = stop_process(proc)
    shutil.rmtree(tmp, ignore_errors=True)
    assert code == 0, f"the daemon exited {code}: {''.join(proc.log_lines[-30:])}"


def daemon(args: argparse.Namespace, mod: Any) -> Counter[str]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from support import ACTIONABLE, Healthy, tls_channel, wait_only_tenants

    from gpupool._proto import device_pb2_grpc

    counts: Counter[str] = Counter()
    tmp, proc, address, served = _serve(args, "fuzz-native-")
    recs = [json.loads(Path(p).read_text()) for p in args.recording]
    channel = tls_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = device_pb2_grpc.DeviceStub(channel)
    neighbour = Healthy(address, served.token(tenant="neighbour", quota_bytes=64 << 20))
    deadline = time.monotonic() + args.seconds
    rng = random.Random(args.seed)
    try:
        case = 0
        while time.monotonic() < deadline and (args.inputs == 0 or counts["frames"] < args.inputs):
            d = recs[case % len(recs)]
            case += 1
            codes = _hostile_session(stub, channel, served, d, random.Random(rng.getrandbits(64)), counts)
            for code in codes:
                counts[code] += 1
                assert code.startswith("stream:") or code in ACTIONABLE, code
            assert proc.poll() is None, "the daemon died"
            assert not neighbour.failures, neighbour.failures
            counts["sessions"] += 1
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        neighbour.check(min_iterations=2)
        counts["neighbour iterations"] = neighbour.iterations
        wait_only_tenants(stub, {"neighbour"})
    finally:
        neighbour.close()
        channel.close()
        _stop(proc, tmp)
    return counts


def _move_record(rec: bytes, old: int, new: int) -> bytes:
    import test_runner_fuzz as F

    out = bytearray(rec)
    for at in F.Fields(rec).handles:
        h = int.from_bytes(out[at : at + 8], "little")
        if h >> 32 == old:
            out[at : at + 8] = ((new << 32) | (h & 0xFFFFFFFF)).to_bytes(8, "little")
    return bytes(out)


def _move(cmds: list[Any], old: int, new: int) -> list[Any]:
    def mv(h: int) -> int:
        return (new << 32) | (h & 0xFFFFFFFF) if h >> 32 == old else h

    out = []
    for c in cmds:
        c2 = device_pb2.Command()
        c2.CopyFrom(c)
        kind = c2.WhichOneof("cmd")
        if kind == "eager_op":
            c2.eager_op = _move_record(c2.eager_op, old, new)
        elif kind == "op":
            for a in list(c2.op.args) + list(c2.op.kwargs.values()):
                if a.WhichOneof("value") == "tensor":
                    a.tensor = mv(a.tensor)
                elif a.WhichOneof("value") == "tensors":
                    a.tensors.handles[:] = [mv(h) for h in a.tensors.handles]
            c2.op.outputs[:] = [mv(h) for h in c2.op.outputs]
        elif kind in ("upload", "get"):
            getattr(c2, kind).handle = mv(getattr(c2, kind).handle)
        elif kind == "free":
            c2.free.handles[:] = [mv(h) for h in c2.free.handles]
        elif kind == "sync":
            c2.sync.scalar_handles[:] = [mv(h) for h in c2.sync.scalar_handles]
        out.append(c2)
    return out


def _hostile_session(stub: Any, channel: Any, served: Any, d: dict[str, Any], rng: random.Random,
                     counts: Counter[str]) -> list[str]:  # fmt: skip
    import threading

    from support import stream_errors

    reply = stub.Attach(device_pb2.AttachRequest(token=served.token(quota_bytes=32 << 20)), timeout=10)
    number = reply.handle_base >> 32
    gen = Gen(rng, number)
    frames = [_move(list(device_pb2.ClientFrame.FromString(bytes.fromhex(f)).commands), d["number"], number)
              for f in d["frames"]]  # fmt: skip
    live: set[int] = set()
    payloads: list[bytes] = []
    for n, cmds in enumerate(frames):
        for c in cmds:
            if c.HasField("upload") and c.upload.offset == 0:
                live.add(c.upload.handle)
            elif c.eager_op and len(c.eager_op) >= 14:
                live.update(int.from_bytes(c.eager_op[6 + 8 * j : 14 + 8 * j], "little") for j in range(1))
            elif c.HasField("free"):
                live.difference_update(c.free.handles)
                gen.freed = (gen.freed + list(c.free.handles))[-64:]
        gen.live = sorted(live)
        bodies = damage_stream(gen, cmds, 0.5, 0.02) if n >= d["start"] else [c.SerializeToString() for c in cmds]
        payload = frame_of(bodies)
        if n >= d["start"] and rng.random() < 0.02:
            payload = gen.bytes_damage(payload)  # a malformed frame: its stream ends
        payloads.append(payload)
    final = 2**63 + 7
    done = threading.Event()

    def requests() -> Any:
        for i, p in enumerate(payloads, start=1):
            yield p
            yield frame_of([ld(6, key(1, 0) + varint(i))])  # Sync(request_id=i): the frame's first error
        yield frame_of([ld(6, key(1, 0) + varint(final))])
        done.wait(60)

    try:
        codes, ended = stream_errors(channel, reply.session_id, requests(), final, 120)
    finally:
        done.set()
    if ended is not None:
        counts["ended: " + re.sub(r"\(\d+ bytes\)", "(N bytes)", ended)[:50]] += 1
    counts["frames"] += len(payloads)
    stub.Detach(device_pb2.DetachRequest(session_id=reply.session_id), timeout=10)
    return codes


# ---- graph-daemon: GraphGen's frames through a live daemon, on the stream and on the side socket ----

GD_GID = 1  # the hostile sessions' graph id, and the neighbour's (each session's graphs are its own)


class _GdGraph:
    """A `GraphShape` defined on a live session as graph `gid`: its runs' inputs (0: by value), its persistent and
    kept handles, and the persistent tensors' values as the session's runs left them (`mirror`)."""

    def __init__(self, s: Any, shape: GraphShape, gid: int) -> None:
        self.shape, self.gid = shape, gid
        self.persistent = [int(s.new_handle()) for _ in shape.persistent]
        self._bind(s)
        self.inputs = [0 if by_value else int(s.upload(shape.value(i, 0))) for i, (_, by_value) in
                       enumerate(shape.inputs)]  # fmt: skip
        self.kept = shape.kept_handles(self.persistent, lambda: int(s.new_handle()))
        s.define_graph(shape.define(gid, self.persistent, self.kept))
        self.mirror = shape.values()
        self.dropped: set[int] = set()  # kept handles a frame's `drop_writes` named: no longer written by a run

    def owned(self) -> list[int]:
        return [*self.persistent, *self.kept, *(h for h in self.inputs if h)]

    def _bind(self, s: Any) -> None:
        """The persistent handles bound to their first values (a view: an op of its base's handle)."""
        from gpupool.client.session import Handle

        for j, t in enumerate(self.shape.persistent):
            if j not in self.shape.views:
                s.upload(t.clone(), handle=self.persistent[j])
        for j, (b, start, end) in self.shape.views.items():
            s.call("aten::slice.Tensor", Handle(self.persistent[b]), 0, start, end, outputs=[self.persistent[j]])

    def data(self, k: int) -> list[bytes]:
        return [self.shape.value(i, k).numpy().tobytes() if not h else b"" for i, h in enumerate(self.inputs)]

    def reset(self, s: Any) -> None:
        """The persistent tensors and by-handle inputs uploaded again (a fuzzed frame may have named them as outputs:
        rebound to a run's result, or poisoned by a failed run; a run may have updated them in place)."""
        self._bind(s)
        for i, h in enumerate(self.inputs):
            if h:
                s.upload(self.shape.value(i, 0), handle=h)
        self.mirror = self.shape.values()

    def check(self, s: Any, k: int) -> None:
        """A run with run `k`'s inputs: every output and kept tensor what `shape.ref` computes, bit for bit."""
        from gpupool.client.session import Handle

        shape = self.shape
        outs = [int(s.new_handle()) for _ in shape.outputs]
        s.run_graph(self.gid, self.inputs, outs, data=self.data(k))
        xs = [shape.value(i, 0 if h else k) for i, h in enumerate(self.inputs)]
        before = [t.clone() for t in self.mirror]
        want = shape.ref(*xs, *self.mirror)
        for w, j in shape.write_to.items():  # a write a frame's `drop_writes` named binds its handle no more
            if self.kept[w] in self.dropped:
                self.mirror[j].copy_(before[j])
        for j, h in enumerate(outs + self.kept):
            if h in self.dropped:
                continue
            got = s.download(Handle(h))
            w = want[j]
            assert got.dtype == w.dtype and torch.equal(got, w), f"graph {self.gid} ({shape.name}): a wrong {j}"
        s.free(outs)


def graph_daemon(args: argparse.Namespace, mod: Any) -> Counter[str]:
    """A live `gpupool serve --bulk-listen` on loopback: hostile sessions, each on its side socket (frames there,
    GPBULK2) or on its gRPC stream, define a graph, run it until its runs are quiet and traced (the worker reads a
    lone RunGraph frame's bytes in C++), then send `GraphGen`'s frames (other sessions' handles and graph ids: a
    neighbour's graph has the same id) with a sync after each; every error a client can act on, only a frame upb
    refuses ends the session (INVALID_ARGUMENT), a session that goes on computes its graph right at its end. A
    neighbour computes verified matmuls throughout (`Healthy`) and another runs its own graph of the same id,
    checked after every hostile session; at the end the daemon is SERVING, holds only the neighbours' sessions and
    exits 0."""
    import os

    from gpupool.client.session import Session
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from support import ACTIONABLE, Healthy, tls_channel, wait_only_tenants

    from gpupool._proto import device_pb2_grpc
    from gpupool.errors import GpupoolError

    counts: Counter[str] = Counter()
    tmp, proc, address, served = _serve(args, "fuzz-graphs-", "--bulk-listen", "127.0.0.1:0")
    channel = tls_channel(address)
    stub = device_pb2_grpc.DeviceStub(channel)
    was = os.environ.get("GPUPOOL_SIDE_FRAMES")
    neighbour = Healthy(address, served.token(tenant="neighbour", quota_bytes=64 << 20))
    nb = Session.attach(address, served.token(tenant="graphs", quota_bytes=64 << 20))
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.seconds
    try:
        nb_g = _GdGraph(nb, _shapes(64)[0], GD_GID)
        nb_g.check(nb, 0)
        case = 0
        while time.monotonic() < deadline and (args.inputs == 0 or counts["frames"] < args.inputs):
            case += 1
            r = random.Random(rng.getrandbits(64))
            side = r.random() < 0.6
            os.environ["GPUPOOL_SIDE_FRAMES"] = "1" if side else "0"
            counts["sessions on the side socket" if side else "sessions on the stream"] += 1
            _gd_session(Session.attach(address, served.token(quota_bytes=64 << 20)), r, counts, ACTIONABLE,
                        [*nb_g.owned(), nb.handle_base + 1], GpupoolError, case == 1)  # fmt: skip
            assert proc.poll() is None, "the daemon died"
            assert not neighbour.failures, neighbour.failures
            nb_g.check(nb, case)  # the neighbour's graph of the same id, as it was
            counts["sessions"] += 1
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        neighbour.check(min_iterations=2)
        counts["neighbour iterations"] = neighbour.iterations
        wait_only_tenants(stub, {"neighbour", "graphs"})
    finally:
        if was is None:
            os.environ.pop("GPUPOOL_SIDE_FRAMES", None)
        else:
            os.environ["GPUPOOL_SIDE_FRAMES"] = was
        neighbour.close()
        nb.close()
        channel.close()
        _stop(proc, tmp)
    return counts


def _gd_session(s: Any, r: random.Random, counts: Counter[str], actionable: frozenset[str], foreign: list[int],
                error: type[BaseException], first: bool = False) -> None:  # fmt: skip
    """One hostile session: its graph defined (round 45: one of `_shapes`; the first, round 44's, with a by-value
    input of 12 floats or of ~64 KiB: then its lone RunGraph frames are 64 KiB - 1, 64 KiB and 64 KiB + 1 bytes as
    they are; a run's `first` session: that one, however short the run), made quiet, then fuzzed frames, each
    synced."""
    n = 16_370 if first else r.choice([12, 12, 16_370])
    shapes = _shapes(n)
    shape = shapes[0] if first or r.random() < 0.4 else r.choice(shapes[1:])
    counts[f"shape:{shape.name}"] += 1
    gid = GD_GID
    gg = _GdGraph(s, shape, gid)
    for k in range(3):  # a replay, the trace, a quiet run: the next lone frames are read from their bytes
        gg.check(s, k)
    gen = GraphGen(r, gid, s.handle_base, gg.inputs, gg.data(7), len(shape.outputs), gg.owned(), foreign, [7, 2])
    ended = False
    dropped = False
    try:
        for _ in range(r.randrange(8, 24)):
            kind, frame = gen.frame()
            while _upb(frame) is None and r.random() < 0.9:  # most of a session's frames parse: it goes on
                kind, frame = gen.frame()
            if kind == "64k" and n > 12 and shape is shapes[0] and r.random() < 0.7:  # a lone RunGraph of that size
                frame = gen.sized(r.choice([65535, 65536, 65537]))
                kind = "64k lone" if _upb(frame) is not None and len(_upb(frame)) == 1 else kind
            counts["frames"] += 1
            counts[f"sent:{kind}"] += 1
            malformed = _upb(frame) is None
            dropped = dropped or kind == "drop"
            for c in _upb(frame) or []:  # a RunGraph's `drop_writes` of its kept handles: they stay as they are
                if c.HasField("run_graph") and c.run_graph.graph_id == gid:
                    gg.dropped.update(set(c.run_graph.drop_writes) & set(gg.kept))
            s.send_commands(frame)
            try:
                s.sync()
                assert not malformed, f"a frame upb refuses was taken: {frame[:64].hex()}"
                counts["synced"] += 1
            except error as exc:
                code = exc.code.name  # type: ignore[attr-defined]
                counts[f"code:{code}"] += 1
                assert code in actionable, (code, str(exc)[:300])
                if malformed:  # the session's stream ends with it
                    if code != "INVALID_ARGUMENT":  # (round 44, reader44: the commands before it ran: their error
                        counts["malformed after an error"] += 1  # first, then the stream's end)
                        try:
                            s.sync()
                        except error as end:
                            code = end.code.name  # type: ignore[attr-defined]
                        else:
                            raise AssertionError(f"a session went on after a frame upb refuses: {frame[:64].hex()}")
                    assert code == "INVALID_ARGUMENT", (code, str(exc)[:300])
                    ended = True
                    break
        if not ended:  # the session goes on: a graph of its own computes right
            gid2 = 1000 + r.randrange(1000)
            g2 = _GdGraph(s, r.choice(_shapes(12)), gid2)
            for k in range(3):
                g2.check(s, k)
            if dropped:  # (or not: a DropGraph of another session's id drops nothing) defined again
                gg = _GdGraph(s, shape, gid)
            else:  # a frame may have named a persistent tensor or an input as an output (rebound to a run's
                # result, or poisoned by a failed run), a run updated one in place: their values again
                gg.reset(s)
            try:
                for k in range(3):  # and quiet again: from the frame's bytes
                    gg.check(s, 9 + k)
                counts["fuzzed graph right after"] += 1
            except error as exc:
                raise AssertionError(f"the session's graph failed after the frames: {exc}") from None
            counts["sessions gone on"] += 1
        else:
            counts["sessions ended"] += 1
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=["parsers", "runs", "daemon", "graphs", "graph-daemon", "attention"])
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    ap.add_argument("--inputs", type=int, default=0, help="stop after this many inputs (frames; 0: no bound)")
    ap.add_argument("--skip", type=int, default=0, help="parsers: start at this input (a failure's number)")
    rec = "bench/eager_replay.py --dump's recording (runs, daemon: needed; parsers: its records)"
    ap.add_argument("--recording", action="append", default=[], help=rec)
    flag = "daemon: a flag for `gpupool serve` (--daemon-flag=--isolation --daemon-flag=thread)"
    ap.add_argument("--daemon-flag", action="append", default=[], help=flag)
    args = ap.parse_args(argv)
    if args.mode in ("runs", "daemon") and not args.recording:
        ap.error(f"{args.mode} needs --recording")
    from gpupool.server import native_runner

    mod = native_runner.load()
    if mod is None and args.mode not in ("daemon", "graph-daemon"):
        print("the native runner is not loaded here (see GPUPOOL_NATIVE_RUNNER_SANITIZE, scripts/runner_asan.sh)")
        return 2
    print(f"{args.mode}: seed {args.seed}, {args.seconds:.0f} s, runner {getattr(mod, '__file__', None)}", flush=True)
    start = time.monotonic()
    try:
        modes = {
            "parsers": parsers,
            "runs": runs,
            "daemon": daemon,
            "graphs": graphs,
            "graph-daemon": graph_daemon,
            "attention": attention_fuzz,
        }
        counts = modes[args.mode](args, mod)
    except Exception:  # a reference that raised where the C++ reading accepted counts as a finding too
        traceback.print_exc()
        return 1
    print(f"{args.mode}: {time.monotonic() - start:.0f} s, {dict(counts)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
