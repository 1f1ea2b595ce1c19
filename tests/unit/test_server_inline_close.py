"""`--isolation thread`: a closed session leaves nothing behind in its runner's executor (the compact op id table,
device and record templates it kept per session id), since the runner object can outlive the close."""

from __future__ import annotations

from gpupool.server.worker import InlineRunner, WorkerSpec

from gpupool import compact
from gpupool._proto import device_pb2


def _no_reply(item: object) -> None:
    raise AssertionError("ops are not answered")


def test_closing_an_inline_session_drops_its_executor_tables() -> None:
    spec = WorkerSpec(
        session_id="s-inline",
        number=1,
        device={"index": 0, "uuid": "fake-0", "model": "fake", "memory_bytes": 1 << 30, "fake": True},
        quota=1 << 28,
        max_handles=1000,
        max_op_flops=0,
        memory_limit=0,
        cpu_threads=1,
        user="",
        seccomp=False,
    )
    runner = InlineRunner(spec)
    state = runner._state
    s, ex = state.session, state.executor
    out = s.handle_base + 1
    head = compact.head(1, "aten::ones.default", [out])
    ex.execute(s, device_pb2.Command(eager_op=head + b"\x01" + compact.encode_value([2, 3]) + b"\x00"), _no_reply)
    again = compact.head(1, None, [out + 1]) + b"\x01" + compact.encode_value([2, 3]) + b"\x00"
    ex.execute(s, device_pb2.Command(eager_op=again), _no_reply)  # learns a template
    assert s.error is None, s.error
    assert tuple(s.tensors[out].shape) == (2, 3) and tuple(s.tensors[out + 1].shape) == (2, 3)
    assert s.session_id in ex._op_ids and s.session_id in ex._eager
    assert ex._eager[s.session_id][2].count == 1
    runner.close()
    assert s.session_id not in ex._op_ids
    assert s.session_id not in ex._eager
    assert not s.tensors
