"""The op table (allowlist, denials, name validation) and meta sizing of what ops allocate."""

from __future__ import annotations

import pytest
import torch
from gpupool.server.ops import OpTable
from gpupool.server.sizing import NO_META, MetaSizer

from gpupool.errors import InvalidArgument, PermissionDenied

aten = torch.ops.aten


def test_resolves_aten_overloads() -> None:
    table = OpTable()
    assert table.resolve("aten::add.Tensor") is aten.add.Tensor
    assert table.resolve("aten::mm") is aten.mm.default
    assert table.resolve("aten::_softmax.default") is aten._softmax.default


@pytest.mark.parametrize(
    "name",
    [
        "aten::from_file",
        "aten::from_file.default",
        "aten::save",
        "aten::_share_memory_.default",
        "prim::device",
        "quantized::add",
        "torchvision::nms",
        "aten::set_.source_Storage",
    ],
)
def test_denies_what_reaches_the_host(name: str) -> None:
    with pytest.raises(PermissionDenied):
        OpTable().resolve(name)


@pytest.mark.parametrize(
    "name",
    [
        "aten::__class__",
        "aten::add.__dict__",
        "aten::",
        "aten::Add",
        "aten::no_such_op",
        "aten::add.nope",
        "aten::add.Tensor.x",
        "aten::" + "a" * 200,
    ],
)
def test_rejects_malformed_or_unknown_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        OpTable().resolve(name)


def test_meta_sizing_counts_new_storages_only() -> None:
    sizer = MetaSizer()
    x = torch.zeros(10, 10)
    assert sizer.new_bytes(aten.add.Tensor, [x, x], {}) == 400
    assert sizer.new_bytes(aten.t.default, [x], {}) == 0  # a view allocates nothing
    assert sizer.new_bytes(aten.add_.Tensor, [x, x], {}) == 0
    assert sizer.new_bytes(aten.empty.memory_format, [[1 << 40]], {"device": torch.device("cpu")}) == 4 << 40
    assert sizer.new_bytes(aten.resize_.default, [x, [1000]], {}) == 4000 - 400
    assert sizer.new_bytes(aten.nonzero.default, [x], {}) == NO_META
    assert sizer.new_bytes(aten.split.Tensor, [x, 3], {}) == 0


def test_meta_sizing_is_cached_by_metadata_and_arguments() -> None:
    sizer = MetaSizer()
    a, b = torch.zeros(4, 4), torch.ones(4, 4)
    assert sizer.new_bytes(aten.mm.default, [a, b], {}) == 64
    assert len(sizer._cache) == 1
    assert sizer.new_bytes(aten.mm.default, [b, a], {}) == 64  # same metadata: a cache hit
    assert len(sizer._cache) == 1
    assert sizer.new_bytes(aten.mm.default, [torch.zeros(4, 8), torch.zeros(8, 2)], {}) == 32
    assert len(sizer._cache) == 2


def test_meta_sizing_reports_shape_errors_as_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        MetaSizer().new_bytes(aten.mm.default, [torch.zeros(2, 3), torch.zeros(2, 3)], {})
