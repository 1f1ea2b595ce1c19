"""The worker's op audit (server/opaudit.py, `GPUPOOL_OP_AUDIT`): what bench/op_audit.py's table is counted with."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from gpupool.server import guards, opaudit


def test_counts_aten_calls_and_host_reads_by_the_line_that_made_them() -> None:
    counts = opaudit.Counts()
    x = torch.arange(6).view(2, 3)
    with counts:
        y = (x + 1).t()
        value = int(y.sum())
        guards.bounds(y)
    assert value == 21
    per_op: dict[str, int] = {}
    for key, n in counts.calls.items():
        per_op[key.partition("|")[0]] = per_op.get(key.partition("|")[0], 0) + n
    assert per_op["aten.add"] == 1 and per_op["aten.t"] == 1 and per_op["aten.aminmax"] == 1
    assert per_op["aten._local_scalar_dense"] == 3  # int(), and the CPU's two reads of `bounds`
    reads = {key.partition("|")[2].rsplit(":", 1)[0]: n for key, n in counts.reads.items()}
    assert reads == {
        "tests/unit/test_opaudit.py:test_counts_aten_calls_and_host_reads_by_the_line_that_made_them": 1,
        "server/guards.py:bounds": 2,
    }
    (aminmax_site,) = [k.partition("|")[2] for k in counts.calls if k.startswith("aten.aminmax|")]
    assert aminmax_site.startswith("server/guards.py:bounds:")
    assert opaudit.launches("aten.add", torch.ops.aten.add.Tensor)
    assert not opaudit.launches("aten.t", torch.ops.aten.t.default)
    assert not opaudit.launches("aten.empty", torch.ops.aten.empty.memory_format)


def test_a_workers_audit_appends_its_totals_and_counts_tolist(tmp_path: Path) -> None:
    own = torch.Tensor.__dict__.get("tolist")
    audit = opaudit.WorkerAudit(str(tmp_path))
    try:
        torch.ones(3).tolist()
        audit.dump()
        torch.ones(2).mul(2)
        audit.dump()
    finally:
        audit.close()
    assert torch.Tensor.__dict__.get("tolist") is own and "cpu" not in torch.Tensor.__dict__
    (path,) = tmp_path.glob("worker-*.jsonl")
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert sum(n for k, n in first["reads"].items() if k.startswith("tolist|")) == 1
    assert not any(k.startswith("aten.mul|") for k in first["calls"])
    assert sum(n for k, n in second["calls"].items() if k.startswith("aten.mul|")) == 1
