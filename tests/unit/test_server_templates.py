"""Record templates (server/templates.py): a compact record laid out as one seen before is decoded with one unpack,
and must behave exactly as the full decode (the reference). Each test runs the same records through two executors
on identical sessions, one with templates and one whose templates are never learned, and compares everything a
client can observe: each record's error (code, op, message), the poisoned handles, every live tensor's value,
the memory counted. A counter checks that the template path really ran."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.server import slices, templates
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession
from support import assert_same_sessions

from gpupool import compact, wire
from gpupool._proto import device_pb2

NUMBER = 3
BASE = NUMBER << 32
A, B, C, UP, FREED = BASE + 1, BASE + 2, BASE + 3, BASE + 4, BASE + 5
FOREIGN = (NUMBER + 1 << 32) + 1


class Pair:
    """Two executors and sessions fed the same commands: `ex[0]` learns templates, `ex[1]` never does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hits = 0
        learn, fill = templates.learn, templates.fill
        self.learning = True

        def counted_fill(*a: Any) -> Any:
            self.hits += 1
            return fill(*a)

        monkeypatch.setattr(templates, "learn", lambda *a: learn(*a) if self.learning else None)
        monkeypatch.setattr(templates, "fill", counted_fill)
        self.ex = [CommandExecutor(slices.SliceLedger()) for _ in range(2)]
        self.s = []
        for _ in range(2):
            dev = FakeDevice(0, "h", 1 << 30)
            s = WorkerSession("t", NUMBER, dev, DeviceMemory(dev), 1 << 24, max_handles=64)
            s.bind(A, torch.arange(6, dtype=torch.float32).reshape(2, 3))
            s.bind(B, torch.full((2, 3), 0.5))
            s.bind(C, torch.ones(6))
            s.bind(FREED, torch.ones(1))
            s.free([FREED])
            self.s.append(s)

    def start_upload(self) -> None:
        """Handle UP half uploaded (the executor then resolves every handle through the session's checks)."""
        meta = wire.meta_to_proto(torch.zeros(4))
        self.run(device_pb2.Command(upload=device_pb2.Upload(handle=UP, meta=meta, data=bytes(4), last=False)))

    def run(self, cmd: device_pb2.Command) -> None:
        seen = []
        for learning, ex, s in zip((True, False), self.ex, self.s, strict=True):
            self.learning = learning
            ex.execute(s, cmd, _no_reply)
            err, s.error = s.error, None
            seen.append(None if err is None else (err.code, err.op, err.message))
        assert seen[0] == seen[1], cmd
        self.same()

    def op(self, data: bytes) -> None:
        self.run(device_pb2.Command(eager_op=data))

    def same(self) -> None:
        assert_same_sessions(*self.s)


def _no_reply(item: object) -> None:
    raise AssertionError("ops are not answered")


def record(op_id: int, name: str | None, outputs: list[int], args: list[bytes], kwargs: dict[str, bytes]) -> bytes:
    parts = [compact.head(op_id, name, outputs), compact.U8.pack(len(args)), *args, compact.U8.pack(len(kwargs))]
    for k, v in kwargs.items():
        parts += [compact.kwarg_key(k), v]
    return b"".join(parts)


def add(out: int, x: int, y: int, alpha: float, name: str | None = None) -> bytes:
    args = [compact.tensor(x), compact.tensor(y)]
    return record(1, name, [out], args, {"alpha": compact.encode_value(alpha)})


def variants(data: bytes) -> Iterator[bytes]:
    """Every one-byte change of `data` (three values per byte), every truncation, one trailing byte."""
    for i in range(len(data)):
        for x in (0x01, 0x80, 0xFF):
            yield data[:i] + bytes([data[i] ^ x]) + data[i + 1 :]
    for n in range(len(data)):
        yield data[:n]
    yield data + b"\x00"


@pytest.fixture
def pair(monkeypatch: pytest.MonkeyPatch) -> Pair:
    return Pair(monkeypatch)


def test_a_repeated_record_hits_with_new_handles_and_new_step_sizes(pair: Pair) -> None:
    pair.op(add(BASE + 10, A, B, 1.0, "aten::add.Tensor"))
    pair.op(add(BASE + 11, A, B, 2.0))  # learned here
    assert pair.hits == 0
    pair.op(add(BASE + 12, BASE + 11, A, 0.25))  # another input, another output, another alpha: one template
    pair.op(add(BASE + 13, BASE + 12, BASE + 10, -3.0))
    assert pair.hits == 2
    assert torch.equal(pair.s[0].tensors[BASE + 13], pair.s[0].tensors[BASE + 12] - 3 * pair.s[0].tensors[BASE + 10])
    for k, factor in enumerate((2.0, 0.5, -1.5)):  # a positional Scalar keyed by type
        name = "aten::mul.Scalar" if k == 0 else None
        pair.op(record(2, name, [BASE + 14 + k], [compact.tensor(A), compact.encode_value(factor)], {}))
    assert pair.hits == 3
    assert torch.equal(pair.s[0].tensors[BASE + 16], pair.s[0].tensors[A] * -1.5)


def test_every_bad_handle_fails_on_a_template_as_in_the_full_decode(pair: Pair) -> None:
    pair.op(add(BASE + 10, A, B, 1.0, "aten::add.Tensor"))
    pair.op(add(BASE + 11, A, B, 1.0))
    for upload in (False, True):  # live handles are looked up first only while no upload is under way
        if upload:
            pair.start_upload()
        pair.op(add(BASE + 20, FOREIGN, A, 1.0))  # PERMISSION_DENIED
        pair.op(add(BASE + 21, A, FREED, 1.0))  # NOT_FOUND
        pair.op(add(BASE + 22, A, UP, 1.0))  # NOT_FOUND, then FAILED_PRECONDITION: still uploading
    pair.op(add(BASE + 23, BASE, A, 1.0))  # handle 0 of the session
    pair.op(add(BASE + 24, BASE + 20, A, 1.0))  # a poisoned input: the first op's error
    pair.op(add(BASE + 25, A, C, 1.0))  # shapes (2, 3) and (6,): the kernel's error
    pair.op(add(FOREIGN, A, B, 1.0))  # a foreign output
    pair.op(add(BASE, A, B, 1.0))  # output handle 0
    pair.op(add(BASE + 26, A, B, float("nan")))
    assert pair.hits == 12
    assert set(pair.s[0].poisoned) >= {BASE + 20, BASE + 21, BASE + 22, BASE + 23, BASE + 24, BASE + 25}
    # Once the upload ends, the handle reads (the hit path looks live handles up first only without uploads).
    pair.run(device_pb2.Command(upload=device_pb2.Upload(handle=UP, offset=4, data=bytes(12), last=True)))
    pair.op(record(2, "aten::mul.Tensor", [BASE + 27], [compact.tensor(C), compact.tensor(C)], {}))
    pair.op(record(2, None, [BASE + 28], [compact.tensor(C), compact.tensor(C)], {}))
    pair.op(record(2, None, [BASE + 29], [compact.tensor(UP), compact.tensor(UP)], {}))
    assert pair.hits == 13


def test_every_changed_byte_of_a_learned_record_behaves_as_the_full_decode(pair: Pair) -> None:
    pair.op(add(BASE + 10, A, B, 1.0, "aten::add.Tensor"))
    pair.op(record(2, "aten::view", [BASE + 11], [compact.tensor(A), compact.encode_value([3, 2])], {}))
    good_add = add(BASE + 12, A, B, 0.5)
    good_view = record(2, None, [BASE + 13], [compact.tensor(BASE + 12), compact.encode_value([6, 1])], {})
    for good in (good_add, good_view):
        pair.op(good)  # learned
        before = pair.hits
        pair.op(good)
        assert pair.hits == before + 1
        for bad in variants(good):
            pair.op(bad)
            pair.op(good)  # the template stays, and still hits
        assert pair.hits > before + len(good)


def test_tensor_lists_and_scalar_lists(pair: Pair) -> None:
    """Foreach ops: tensor lists (0 entries are None) and `Scalar[]` step sizes, which are fields of their own."""
    lst = [A, B]
    pair.op(record(3, "aten::_foreach_add.List", [BASE + 10, BASE + 11], [compact.tensors(lst), compact.tensors(lst)],
                   {"alpha": compact.encode_value(2.0)}))  # fmt: skip
    for k, scalars in enumerate(([0.5, 2.0], [1.5, -1.0], [3.0, 0.0])):
        name = "aten::_foreach_mul_.ScalarList" if k == 0 else None
        pair.op(record(4, name, [], [compact.tensors([BASE + 10, BASE + 11]), compact.encode_value(scalars)], {}))
    pair.op(record(3, None, [BASE + 12, BASE + 13], [compact.tensors([A, C]), compact.tensors(lst)], {}))
    pair.op(record(3, None, [BASE + 14, BASE + 15], [compact.tensors([A, FOREIGN]), compact.tensors(lst)], {}))
    pair.op(record(3, None, [BASE + 14, BASE + 15], [compact.tensors([A, 0]), compact.tensors(lst)], {}))
    pair.op(record(4, None, [], [compact.tensors([BASE + 10, FREED]), compact.encode_value([1.0, 1.0])], {}))
    assert pair.hits == 4
    good = record(4, None, [], [compact.tensors([BASE + 10, BASE + 11]), compact.encode_value([0.5, 0.5])], {})
    for bad in variants(good):
        pair.op(bad)
    # One variant names op 4 (its name-length byte 0 -> 1: the name is the outputs count, "\x00", and the outputs
    # are read from the arguments): a record that names its op defines it anew even where the rest fails to decode
    # (server/executor.py `_enter`, round 40: the client counts the name sent), which forgets op 4's templates.
    # Define it again and learn its template again, so that the records below meet a half upload on the template.
    assert pair.ex[0]._op_ids["t"][4] == "\x00"
    again = [compact.tensors([BASE + 10, BASE + 11]), compact.encode_value([1.0, 1.0])]
    pair.op(record(4, "aten::_foreach_mul_.ScalarList", [], again, {}))
    pair.op(record(4, None, [], again, {}))  # learned
    before = pair.hits
    pair.start_upload()
    pair.op(record(4, None, [], [compact.tensors([BASE + 10, UP]), compact.encode_value([1.0, 1.0])], {}))
    pair.op(record(3, None, [BASE + 16, BASE + 17], [compact.tensors([A, B]), compact.tensors([UP, A])], {}))
    assert pair.hits == before + 2


def test_an_op_id_defined_anew_forgets_its_templates(pair: Pair) -> None:
    pair.op(add(BASE + 10, A, B, 1.0, "aten::add.Tensor"))
    pair.op(add(BASE + 11, A, B, 1.0))
    pair.op(add(BASE + 12, A, B, 1.0))
    assert pair.hits == 1
    pair.op(add(BASE + 13, A, B, 1.0, "aten::sub.Tensor"))  # the same id names another op from now on
    pair.op(add(BASE + 14, A, B, 1.0))
    assert torch.equal(pair.s[0].tensors[BASE + 14], pair.s[0].tensors[A] - pair.s[0].tensors[B])
    pair.op(add(BASE + 15, A, B, 1.0, "aten::nonexistent_op"))  # a denied name stays denied by id, hit or not
    pair.op(add(BASE + 16, A, B, 1.0))
    pair.op(add(BASE + 17, A, B, 1.0))
    assert BASE + 17 in pair.s[0].poisoned


def test_the_template_table_is_bounded(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(templates, "MAX_TEMPLATES", 5)
    pair.op(record(2, "aten::view", [BASE + 10], [compact.tensor(C), compact.encode_value([6])], {}))
    shapes = [[1, 6], [6, 1], [2, 3], [3, 2], [1, 1, 6], [6, 1, 1], [2, 1, 3], [3, 1, 2], [1, 2, 3]]
    for k, shape in enumerate(shapes * 2):
        pair.op(record(2, None, [BASE + 11 + k % 3], [compact.tensor(C), compact.encode_value(shape)], {}))
        table = pair.ex[0]._eager["t"][2]
        assert table.count <= 5
        assert all(len(v) <= templates.PER_LAYOUT for s in table.heads.values() for v in s.values())
    pair.ex[0].forget(pair.s[0])
    assert "t" not in pair.ex[0]._eager


def view(h: int, sizes: list[int], strides: list[int], offset: int) -> bytes:
    return compact.view(h, sizes, strides, offset)


def test_view_arguments_on_a_template_behave_as_the_full_decode(pair: Pair) -> None:
    """A view argument's handle is a field and its geometry fixed bytes: a hit resolves the handle through the same
    checks and applies the geometry with the same storage check as the full decode."""
    mul = lambda out, x, y: record(2, None, [out], [view(x, [3, 2], [1, 3], 0), view(y, [3, 2], [1, 3], 0)], {})  # noqa: E731
    pair.op(record(2, "aten::mul.Tensor", [BASE + 10], [view(A, [3, 2], [1, 3], 0), compact.tensor(B)], {}))
    pair.op(mul(BASE + 11, A, B))  # learned
    before = pair.hits
    pair.op(mul(BASE + 12, B, A))
    assert pair.hits == before + 1
    assert torch.equal(pair.s[0].tensors[BASE + 12], (pair.s[0].tensors[A] * pair.s[0].tensors[B]).t())
    pair.op(mul(BASE + 13, FOREIGN, A))  # PERMISSION_DENIED
    pair.op(mul(BASE + 14, A, FREED))  # NOT_FOUND
    pair.op(mul(BASE + 15, A, BASE))  # handle 0 of the session
    pair.op(mul(BASE + 16, A, C))  # C has 6 elements: the same geometry fits its storage
    pair.op(record(5, "aten::resize_", [], [compact.tensor(C), compact.encode_value([2])], {}))
    pair.op(record(6, "aten::set_.source_Storage", [], [compact.tensor(C), compact.tensor(BASE + 10)], {}))
    pair.op(mul(BASE + 17, A, C))  # C's storage is another (shared) one now
    for h, n in ((BASE + 18, 2), (BASE + 19, 6)):  # a storage too small for a learned geometry, then not
        pair.op(record(8, "aten::ones", [h], [compact.encode_value([n])], {}))
        pair.op(mul(BASE + 20 + n, h, A))
    assert pair.hits >= before + 7
    assert set(pair.s[0].poisoned) >= {BASE + 13, BASE + 14, BASE + 15, BASE + 22}
    assert "storage byte 24 of a 8-byte storage" in pair.s[0].poisoned[BASE + 22].message
    assert BASE + 26 in pair.s[0].tensors
    good = mul(BASE + 27, A, B)
    for bad in variants(good):  # flips of its geometry's bytes too: every one behaves as the full decode
        pair.op(bad)
        pair.op(good)


def test_an_in_place_op_through_a_view_argument_writes_its_handles_storage(pair: Pair) -> None:
    pair.op(record(2, "aten::mul_.Scalar", [0], [view(A, [2], [3], 1), compact.encode_value(10.0)], {}))
    for _ in range(2):  # learned, then a template hit
        pair.op(record(2, None, [0], [view(A, [2], [3], 1), compact.encode_value(10.0)], {}))
    assert pair.hits == 1
    assert pair.s[0].tensors[A].tolist() == [[0.0, 1000.0, 2.0], [3.0, 4000.0, 5.0]]
    kw = {"src": view(B, [2], [1], 0)}
    pair.op(record(3, "aten::copy_", [0], [view(C, [2], [2], 1)], kw))
    pair.op(record(3, None, [0], [view(C, [2], [2], 1)], kw))
    pair.op(record(3, None, [0], [view(C, [2], [2], 1)], kw))
    assert pair.hits == 2
    assert pair.s[0].tensors[C].tolist() == [1.0, 0.5, 1.0, 0.5, 1.0, 1.0]
