"""scaled_dot_product_attention with dropout on gpupool: one fused op and its backward (server/attention.py's dropout
composition) instead of torch's math path (~30 records), with the math path's bits. The forward draws its mask from
the session's seeded stream exactly as the math path's `native_dropout` draws it, and the backward draws it again
from the generator state the forward returned in `philox_seed` on a private generator: a training run gives the same
losses, bit for bit, fused or not (`GPUPOOL_FUSED_SDPA=0`, here `set_fused_attention(False)`), eager and captured, and
leaves the session's stream in the same place (the next `torch.rand` on the device is equal). A forged `philox_seed` is
INVALID_ARGUMENT (never a crash); the composition's temporaries count against the quota."""

from __future__ import annotations

import importlib
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from gpupool.client.session import Handle, Session
from shim_fixtures import ServeProcess, withholding_daemon
from test_attention import FUSED, OpLog, Slot, _op

import gpupool.torch as gt
from gpupool import errors, protocol, wire
from gpupool._proto import device_pb2

gt_capture = importlib.import_module("gpupool.client.torch.capture")  # the module (gt.capture is its decorator)

ROOT = Path(__file__).resolve().parents[2]
FORWARD = "aten::_scaled_dot_product_fused_attention_overrideable.default"
BACKWARD = "aten::_scaled_dot_product_fused_attention_overrideable_backward.default"


def _sdpa_bits(dev: torch.device, dtype: torch.dtype, mask: str, causal: bool, scale: Any) -> list[torch.Tensor]:
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=dtype).to(dev).requires_grad_() for n in (6, 5, 5))
    m = None
    if mask == "bool":
        m = (torch.rand(6, 5, generator=g) > 0.3).to(dev)
    elif mask == "float":
        m = torch.randn(2, 1, 6, 5, generator=g).to(dtype).to(dev)
    with OpLog() as log:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.3, is_causal=causal, scale=scale)
    grad = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype).to(dev)
    grads = torch.autograd.grad(out, [q, k, v], grad)
    after = torch.rand(16, device=dev)  # where the session's stream was left
    fused = float(log.ops.count(FUSED))
    return [out.detach().cpu(), *(x.cpu() for x in grads), after.cpu(), torch.tensor(fused)]


@pytest.mark.parametrize(
    "dtype, mask, causal, scale",
    [
        (torch.float32, "none", False, None),
        (torch.float32, "bool", False, 0.5),
        (torch.float32, "none", True, None),
        (torch.float32, "none", False, -0.4),
        (torch.bfloat16, "bool", False, None),
        (torch.bfloat16, "float", False, None),
        (torch.float64, "float", False, 0.3),
    ],
)
def test_a_dropout_call_is_one_fused_op_with_the_math_paths_bits(
    dev: torch.device, fused_on: Any, dtype: torch.dtype, mask: str, causal: bool, scale: Any
) -> None:
    fused_on(True)
    fused = _sdpa_bits(dev, dtype, mask, causal, scale)
    fused_on(False)
    math = _sdpa_bits(dev, dtype, mask, causal, scale)
    assert fused[-1].item() == 1 and math[-1].item() == 0  # one fused op; the math path sends none
    for what, a, b in zip(("out", "grad q", "grad k", "grad v", "next rand"), fused, math, strict=False):
        assert torch.equal(a, b), what


def _encoder_run(dev: torch.device, captured: bool, steps: int) -> tuple[list[float], torch.Tensor, int, Any]:
    """(losses, the next torch.rand on the device, fused ops in the first step, the step) of launch_bound's encoder
    (attention dropout 0.1) trained with Adam from torch.manual_seed(1), seeded again before steps 4, 5 and 7."""
    sys.path.insert(0, str(ROOT / "bench"))
    from launch_bound import adam, training_step, workload

    model, data, loss_fn = workload("encoder")
    model = model.to(dev)
    opt = adam(model, dev, captured)
    step = training_step(model, opt, loss_fn)
    fn = gt.capture(step) if captured else step
    torch.manual_seed(1)
    losses = []
    fused = 0
    for i in range(steps):
        x, y = data[i % len(data)]
        if i == 0:
            with OpLog() as log:
                losses.append(fn(x.to(dev), y.to(dev)))
            fused = log.ops.count(FUSED)
        else:
            if i in (3, 4, 6):  # a new seed before the first replay, the second (the Python one that records the
                # layouts: round 23 drew it from the old stream) and a traced one: its first draw
                torch.manual_seed(i)  # (the attention's) starts the new stream
            losses.append(fn(x.to(dev), y.to(dev)))
    after = torch.rand(32, device=dev).cpu()
    return [float(v.item()) for v in losses], after, fused, fn


def _traced(serve: Any) -> list[str]:
    return [line for line in list(serve.process.log_lines) if "runs as a TorchScript graph" in line]


@pytest.mark.parametrize("captured, in_graphs", [(False, False), (True, False), (True, True)],
                         ids=["eager", "captured", "captured-fused"])  # fmt: skip
def test_an_encoder_with_attention_dropout_trains_to_the_math_paths_bits(
    serve: Any, dev: torch.device, fused_on: Any, captured: bool, in_graphs: bool, monkeypatch: Any
) -> None:
    """launch_bound's `encoder` (dropout 0.1 in attention too), 8 steps of Adam: the same losses, bit for bit, and the
    same next random numbers with the fused op as with the math path. Captured, the recorded step takes the math path
    for its dropout calls (client/torch/capture.py FUSED_DROPOUT_IN_GRAPHS: its aten calls trace into the graph) while
    the eager first step sends the fused op; with FUSED_DROPOUT_IN_GRAPHS the graph holds the fused op (a forward and a
    backward per layer), each fused call one node (server/attention.py `_LIBRARY`). Either graph runs as TorchScript
    from its second replay and every replay draws fresh numbers (8 different losses)."""
    monkeypatch.setattr(gt_capture, "FUSED_DROPOUT_IN_GRAPHS", in_graphs)
    steps = 8
    fused_on(True)
    traced = _traced(serve)
    losses, after, fused_ops, fn = _encoder_run(dev, captured, steps)
    deadline = time.monotonic() + 10  # the daemon's log line comes through its output pipe
    while captured and len(_traced(serve)) == len(traced) and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = _traced(serve)
    fused_on(False)
    want, want_after, math_ops, _ = _encoder_run(dev, captured, steps)
    assert fused_ops == 2 and math_ops == 0  # a fused forward per layer in the (eager) first step
    assert losses == want
    assert torch.equal(after, want_after)
    assert len(set(losses)) == steps
    if captured:
        assert fn.stats["replayed"] == steps - 3
        [g] = fn.graphs.values()
        names = [op.name.split(".")[0] for op in g.built.ops]
        calls = 2 if in_graphs else 0
        assert names.count(FORWARD.split(".")[0]) == calls and names.count(BACKWARD.split(".")[0]) == calls
        assert len(lines) == len(traced) + 1 and f", {2 * calls} fused attention;" in lines[-1]


# ---- a daemon without the fused dropout (AttachReply.features) ----


@pytest.fixture(scope="module")
def old_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A daemon that withholds "sdpa_dropout" and "side_frames" (GPUPOOL_WITHHOLD_FEATURES): its AttachReply names
    neither, as a daemon from before round 24 (it names round 43's "conv_layout" and "rng_state": withheld in
    test_conv_layout.py and test_rng_state.py), and it refuses the fused op with dropout, as a daemon
    from before round 23."""
    yield from withholding_daemon(tmp_path_factory, protocol.FEATURE_SDPA_DROPOUT, protocol.FEATURE_SIDE_FRAMES)


def test_attach_names_the_daemons_features_and_a_withheld_one_is_refused(serve: Any, old_daemon: Any) -> None:
    with Session.attach(serve.address, serve.token()) as s:
        assert protocol.FEATURE_SDPA_DROPOUT in s.features
    with Session.attach(old_daemon.address, old_daemon.token()) as s:
        assert not s.features & {protocol.FEATURE_SDPA_DROPOUT, protocol.FEATURE_SIDE_FRAMES}  # (round 43's named)
        q, k, v = (Handle(s.upload(t)) for t in _inputs())
        [out] = s.call(FORWARD, q, k, v, None, 0.0, outputs=9)[:1]  # without dropout: served, as before round 23
        assert s.download(Handle(out)).shape == (2, 4, 16, 8)
        s.call(FORWARD, q, k, v, None, 0.25, outputs=9)
        with pytest.raises(errors.InvalidArgument, match="dropout_p must be 0"):
            s.sync()


def test_a_daemon_withholding_fused_dropout_refuses_every_form_of_it(old_daemon: Any) -> None:
    """A hostile client that ignores AttachReply.features: the withheld composition runs in no form -- the backward
    with dropout (a forged `philox_seed` of 5,056 bytes that would reach the generator), dropout_p by keyword, a NaN
    or negative dropout_p, and a graph's call (refused at DefineGraph) -- each INVALID_ARGUMENT naming the withheld
    feature (a NaN or negative one: the validator's own refusal), the session serving on; dropout_p 0 (and -0.0) is
    served."""
    with Session.attach(old_daemon.address, old_daemon.token(tenant="withheld")) as s:
        q, k, v = (Handle(s.upload(t)) for t in _inputs())
        fwd = s.call(FORWARD, q, k, v, None, 0.0, outputs=9)
        out, lse, offset = Handle(fwd[0]), Handle(fwd[1]), Handle(fwd[7])
        grad = Handle(s.upload(torch.linspace(-1, 1, 2 * 4 * 16 * 8).reshape(2, 4, 16, 8)))
        [forged] = s.call("aten::select.int", Handle(s.upload(torch.full((632,), 7, dtype=torch.int64))), 0, 0)
        back = [grad, q, k, v, None, [True, True, True, False], out, lse, None, None, 16, 12, 0.25, False]
        for p, match in (
            (0.25, "withholds the sdpa_dropout feature"),
            (float("nan"), "dropout_p"),
            (-0.5, "dropout_p"),
        ):
            back[12] = p
            s.call(BACKWARD, *back, Handle(forged), offset, outputs=4)
            with pytest.raises(errors.InvalidArgument, match=match):
                s.sync()
        s.call(FORWARD, q, k, v, None, outputs=9, dropout_p=0.5)
        with pytest.raises(errors.InvalidArgument, match="withholds the sdpa_dropout feature"):
            s.sync()
        body = [_op(FUSED.replace(".", "::", 1), Slot(1), Slot(2), Slot(3), None, 0.25, False, False,
                    outputs=[4, 5, 0, 0, 0, 0, 6, 7])]  # fmt: skip
        meta = [wire.meta_to_proto(t) for t in _inputs()]
        s.define_graph(device_pb2.DefineGraph(graph_id=3, inputs=3, input_meta=meta, ops=body, outputs=[4]))
        with pytest.raises(errors.InvalidArgument, match="withholds the sdpa_dropout feature"):
            s.sync()
        [again] = s.call(FORWARD, q, k, v, None, -0.0, outputs=9)[:1]
        assert torch.equal(s.download(Handle(again)), s.download(out))


def test_against_a_daemon_without_fused_dropout_training_takes_the_math_path(old_daemon: Any, fused_on: Any) -> None:
    """A client of round 23 sent attention with dropout to any daemon as the fused op, which a daemon from before round
    23 refuses (INVALID_ARGUMENT, "dropout_p must be 0"; the only way out was GPUPOOL_FUSED_SDPA=0). Now the client
    reads AttachReply.features: against a daemon without "sdpa_dropout" the encoder (attention dropout 0.1) trains on
    torch's math path with the fused backend on, to the same bits as with it off, while attention without dropout
    still takes the fused op there."""
    dev = gt.attach(old_daemon.address, old_daemon.token(tenant="old-daemon"))
    try:
        fused_on(True)
        losses, after, fused_ops, _ = _encoder_run(dev, captured=False, steps=3)
        q, k, v = (t.to(dev) for t in _inputs())
        with OpLog() as log:
            F.scaled_dot_product_attention(q, k, v).cpu()
        fused_on(False)
        want, want_after, _, _ = _encoder_run(dev, captured=False, steps=3)
    finally:
        gt.detach_all()
    assert fused_ops == 0 and log.ops.count(FUSED) == 1
    assert losses == want and len(set(losses)) == 3
    assert torch.equal(after, want_after)


# ---- hostile backward arguments, straight to a real daemon ----


@pytest.fixture
def session(serve: Any) -> Iterator[Session]:
    with Session.attach(serve.address, serve.token(tenant="attention-dropout")) as s:
        yield s


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(2, 4, n, 8, generator=g) for n in (16, 12, 12)]


def test_a_forged_philox_seed_is_invalid_and_the_real_one_gives_the_same_gradients_twice(session: Session) -> None:
    s = session
    q, k, v = (Handle(s.upload(t)) for t in _inputs())
    fwd = s.call(FORWARD, q, k, v, None, 0.25, outputs=9)
    out, lse, seed, offset = Handle(fwd[0]), Handle(fwd[1]), Handle(fwd[6]), Handle(fwd[7])
    grad = Handle(s.upload(torch.linspace(-1, 1, 2 * 4 * 16 * 8).reshape(2, 4, 16, 8)))
    good = [grad, q, k, v, None, [True, True, True, False], out, lse, None, None, 16, 12, 0.25, False, seed, offset]
    [garbage] = s.call("aten::select.int", Handle(s.upload(torch.full((632,), 7, dtype=torch.int64))), 0, 0)
    for value, match in [
        (Handle(s.upload(torch.zeros(()))), "0-d int64"),  # float
        (Handle(s.upload(torch.zeros(2, dtype=torch.int64))), "0-d int64"),  # 1-D
        (None, "0-d int64"),
        (3, "0-d int64"),
        (Handle(s.upload(torch.tensor(5, dtype=torch.int64))), "5056-byte generator state"),  # 8 bytes of storage
        (Handle(garbage), "holds no generator state"),  # 5056 bytes, no mt19937 state
    ]:
        args = list(good)
        args[14] = value
        s.call(BACKWARD, *args, outputs=4)
        with pytest.raises(errors.InvalidArgument, match=match):
            s.sync()
    first = [s.download(Handle(h)) for h in s.call(BACKWARD, *good, outputs=3)]
    again = [s.download(Handle(h)) for h in s.call(BACKWARD, *good, outputs=3)]  # the stream did not move
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    want = torch.autograd.grad  # the gradients are dropout's: some grad of v rows differ from no-dropout's
    tensors = [t.requires_grad_() for t in _inputs()]
    plain = want(F.scaled_dot_product_attention(*tensors), tensors, s.download(grad))
    assert not torch.allclose(first[2], plain[2])
    # the composition's own operators (server/attention.py `_LIBRARY`) are the daemon's, never a client's to call
    s.call("gpupool_attention::dropout_backward.default", *good[:4], None, 0.25, False, None, seed, outputs=3)
    with pytest.raises(errors.PermissionDenied, match="only aten:: ops"):
        s.sync()
    [ok] = s.call("aten::add.Tensor", Handle(s.upload(torch.ones(3))), 1)  # the session keeps serving
    assert torch.equal(s.download(ok), torch.full((3,), 2.0))


def _forged_state(left: int, nxt: int) -> torch.Tensor:
    """A real mt19937 state (5056 bytes as 632 int64s) with its `left` and `next` words set."""
    raw = bytearray(torch.Generator().manual_seed(1).get_state().numpy().tobytes())
    struct.pack_into("<iiQ", raw, 8, left, 1, nxt)
    return torch.frombuffer(raw, dtype=torch.int64).clone()


def test_a_philox_seed_whose_draws_would_leave_the_mt19937_state_is_invalid(session: Session) -> None:
    """torch's `set_state` takes left <= 624 and next <= 624, but a draw reads word `next++` until `--left` is 0:
    left 624 with next 624 read 623 words past the state (the generator object's end, then the heap) into the
    mask, whose bits the gradients show -- the same forged state gave other gradients from one call to the next.
    Such a state is INVALID_ARGUMENT before any draw (`_check_mt19937`); states a generator reaches still run."""
    s = session
    q, k, v = (Handle(s.upload(t)) for t in _inputs())
    fwd = s.call(FORWARD, q, k, v, None, 0.25, outputs=9)
    out, lse, offset = Handle(fwd[0]), Handle(fwd[1]), Handle(fwd[7])
    grad = Handle(s.upload(torch.linspace(-1, 1, 2 * 4 * 16 * 8).reshape(2, 4, 16, 8)))
    args = [grad, q, k, v, None, [True, True, True, False], out, lse, None, None, 16, 12, 0.25, False, None, offset]
    for left, nxt in [(624, 624), (624, 2), (2, 624), (1, 625), (625, 0), (0, 1), (624, (1 << 32) + 1)]:
        [seed] = s.call("aten::select.int", Handle(s.upload(_forged_state(left, nxt))), 0, 0)
        args[14] = Handle(seed)
        s.call(BACKWARD, *args, outputs=3)
        with pytest.raises(errors.InvalidArgument, match=f"mt19937 left {left}, next {nxt}"):
            s.sync()
    for left, nxt in [(1, 0), (624, 1), (1, 624), (300, 325)]:  # where a generator's own draws leave it
        [seed] = s.call("aten::select.int", Handle(s.upload(_forged_state(left, nxt))), 0, 0)
        args[14] = Handle(seed)
        gq, _, _ = s.call(BACKWARD, *args, outputs=3)
        assert s.download(Handle(gq)).shape == (2, 4, 16, 8)


def test_sessions_sharing_a_process_neither_see_nor_move_each_others_dropout_stream(daemon_factory: Any) -> None:
    """Under --isolation thread sessions share the process and its CPU generator. The fused forward's philox_seed
    is the generator state its mask came from: each session's is its own stream's (its first 8 bytes: the seed it
    set), and a neighbour's forwards between two of A's leave A's masks those of A alone (`_seeded` swaps states)."""
    daemon = daemon_factory(fake_gpu_memory=64 * 1024 * 1024, isolation="thread")

    def forward(s: Session, xs: list[Handle]) -> tuple[torch.Tensor, int]:
        fwd = s.call(FORWARD, *xs, None, 0.5, outputs=9)
        return s.download(Handle(fwd[0])), int(s.download(Handle(fwd[6])).item())

    with (
        Session.attach(daemon.address, daemon.token(tenant="a")) as a,
        Session.attach(daemon.address, daemon.token(tenant="b")) as b,
    ):
        xa, xb = ([Handle(s.upload(t)) for t in _inputs()] for s in (a, b))
        a.seed(11)
        b.seed(22)
        a1, seed_a = forward(a, xa)
        outs_b = [forward(b, xb) for _ in range(3)]
        a2, _ = forward(a, xa)
    assert seed_a == 11 and {seed for _, seed in outs_b} == {22}
    with Session.attach(daemon.address, daemon.token(tenant="alone")) as c:
        xc = [Handle(c.upload(t)) for t in _inputs()]
        c.seed(11)
        c1, _ = forward(c, xc)
        c2, _ = forward(c, xc)
    assert torch.equal(a1, c1) and torch.equal(a2, c2) and not torch.equal(a1, a2)


def test_the_dropout_composition_counts_against_the_quota(serve: Any) -> None:
    """Without dropout the CPU flash kernel holds no scores: L = S = 1024 fits a 4 MiB session; with dropout the
    composition's temporaries (24 bytes a score forward, 40 backward) are RESOURCE_EXHAUSTED before they run, the
    session usable: the forward at 1024 (24 MiB); at 360 the forward (3 MiB) runs and its backward (5 MiB) is refused;
    at 256 both run."""
    quota = 4 * 1024 * 1024
    with Session.attach(serve.address, serve.token(tenant="attention-dropout-quota", quota_bytes=quota)) as s:
        g = torch.Generator().manual_seed(5)

        def forward(n: int, p: float) -> list[Any]:
            q, k, v = (Handle(s.upload(torch.randn(1, 1, n, 8, generator=g))) for _ in range(3))
            fwd = s.call(FORWARD, q, k, v, None, p, outputs=9)
            grad = Handle(s.upload(torch.ones(1, 1, n, 8)))
            return [grad, q, k, v, None, [True, True, True, False], Handle(fwd[0]), Handle(fwd[1]), None, None, n, n,
                    p, False, Handle(fwd[6]), Handle(fwd[7])]  # fmt: skip

        forward(1024, 0.0)
        s.sync()
        forward(1024, 0.1)
        with pytest.raises(errors.ResourceExhausted, match="quota"):
            s.sync()
        args = forward(360, 0.1)
        s.sync()
        s.call(BACKWARD, *args, outputs=3)
        with pytest.raises(errors.ResourceExhausted, match="quota"):
            s.sync()
        gq, _, _ = s.call(BACKWARD, *forward(256, 0.1), outputs=3)
        assert s.download(Handle(gq)).shape == (1, 1, 256, 8)
        [ok] = s.call("aten::add.Tensor", Handle(s.upload(torch.ones(3))), 1)
        assert torch.equal(s.download(ok), torch.full((3,), 2.0))


def test_an_eager_forwards_kept_softmax_and_mask_count_against_the_quota_until_freed(serve: Any) -> None:
    """An eager forward on a fake GPU keeps the softmax and the mask for its backward in `philox_seed`'s storage after
    the generator state (server/attention.py `_dropout_forward_saving`): 5 bytes a score in float32, counted in the
    session's used bytes with the forward's outputs and given back when the seed is freed; the backward from it has
    the same gradients twice (the stream did not move)."""
    quota = 4 * 1024 * 1024

    with Session.attach(serve.address, serve.token(tenant="attention-dropout-kept", quota_bytes=quota)) as s:

        def used() -> int:
            s.call("aten::empty.memory_format", [quota], dtype=torch.uint8)
            with pytest.raises(errors.ResourceExhausted) as info:
                s.sync()
            assert info.value.used_bytes is not None
            return info.value.used_bytes

        q, k, v = (Handle(s.upload(t)) for t in _inputs())  # (2, 4, 16 | 12 | 12, 8)
        before = used()
        fwd = s.call(FORWARD, q, k, v, None, 0.25, outputs=9)
        scores = 2 * 4 * 16 * 12
        outputs = 4 * 2 * 4 * 16 * 8 + 4 * 2 * 4 * 16 + 3 * 8  # out, logsumexp; L, S, philox_offset: 0-d int64s
        seed_bytes = 5056 + 5 * scores  # the generator state, the float32 softmax, the bool mask (a multiple of 8)
        assert used() - before == outputs + seed_bytes
        grad = Handle(s.upload(torch.linspace(-1, 1, 2 * 4 * 16 * 8).reshape(2, 4, 16, 8)))
        args = [grad, q, k, v, None, [True, True, True, False], Handle(fwd[0]), Handle(fwd[1]), None, None, 16, 12,
                0.25, False, Handle(fwd[6]), Handle(fwd[7])]  # fmt: skip
        first = [s.download(Handle(h)) for h in s.call(BACKWARD, *args, outputs=3)]
        again = [s.download(Handle(h)) for h in s.call(BACKWARD, *args, outputs=3)]
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        held = used()
        s.free([fwd[6]])
        assert held - used() == seed_bytes


def test_float64_dropout_counts_its_8_byte_scores_against_the_quota(serve: Any) -> None:
    """float64 computes the dropout composition's scores in 8-byte elements (34.6 bytes a score forward, 50.7
    backward, measured), which the float32 figures (24, 40) left 1.4x and 1.3x unseen: in a 4 MiB session a
    float64 forward at L = S = 360 (admitted 3.1 MiB, took 4.3 MiB) and a backward at 300 ran. Both are
    RESOURCE_EXHAUSTED now, the session usable; float32 at 360 still runs."""
    quota = 4 * 1024 * 1024
    with Session.attach(serve.address, serve.token(tenant="attention-dropout-f64", quota_bytes=quota)) as s:
        g = torch.Generator().manual_seed(5)

        def qkv(n: int, dtype: torch.dtype) -> list[Handle]:
            return [Handle(s.upload(torch.randn(1, 1, n, 8, generator=g, dtype=dtype))) for _ in range(3)]

        s.call(FORWARD, *qkv(360, torch.float64), None, 0.1, outputs=9)
        with pytest.raises(errors.ResourceExhausted, match="quota"):
            s.sync()
        s.call(FORWARD, *qkv(360, torch.float32), None, 0.1, outputs=9)
        s.sync()
        n = 300
        q, k, v = qkv(n, torch.float64)
        out, grad = (Handle(s.upload(torch.randn(1, 1, n, 8, generator=g, dtype=torch.float64))) for _ in range(2))
        lse = Handle(s.upload(torch.zeros(1, 1, n)))
        [seed] = s.call("aten::select.int", Handle(s.upload(_forged_state(1, 0))), 0, 0)
        zero = Handle(s.upload(torch.zeros((), dtype=torch.long)))
        s.call(BACKWARD, grad, q, k, v, None, [True, True, True, False], out, lse, None, None, n, n, 0.1, False,
               Handle(seed), zero, outputs=3)  # fmt: skip
        with pytest.raises(errors.ResourceExhausted, match="quota"):
            s.sync()
        [ok] = s.call("aten::add.Tensor", Handle(s.upload(torch.ones(3))), 1)
        assert torch.equal(s.download(ok), torch.full((3,), 2.0))


def test_a_compositions_copies_of_wide_heads_count_against_the_quota(serve: Any) -> None:
    """Round 24 counted a composition's temporaries per score only: with few scores and wide heads its copies of the
    inputs ran unadmitted (L = S = 128, head size 2^14, float32: q, k, v 8 MiB each; the dropout forward took 24.6
    MB beyond its output with 0.4 MB admitted, its backward 41 MB with 0.7; bench/attention_temporaries.py "wide
    heads"). A 48 MiB session ran that forward on 24 MiB of inputs (57 MB at its peak), a 96 MiB one its backward
    (108 MB). Now each is RESOURCE_EXHAUSTED before it runs (`FORWARD_ELEMENT_BYTES`, `BACKWARD_ELEMENT_BYTES`), the
    session usable; the forward runs in 96 MiB."""
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(1, 1, 128, 1 << 14, generator=g) for _ in range(3)]
    for mib in (48, 96):
        with Session.attach(serve.address, serve.token(tenant=f"attention-wide-{mib}", quota_bytes=mib << 20)) as s:
            q, k, v = (Handle(s.upload(t)) for t in inputs)
            fwd = s.call(FORWARD, q, k, v, None, 0.1, outputs=9)
            if mib == 48:
                with pytest.raises(errors.ResourceExhausted, match="quota"):
                    s.sync()
            else:
                grad = Handle(s.upload(torch.ones(1, 1, 128, 1 << 14)))
                args = [grad, q, k, v, None, [True, True, True, False], Handle(fwd[0]), Handle(fwd[1]), None, None,
                        128, 128, 0.1, False, Handle(fwd[6]), Handle(fwd[7])]  # fmt: skip
                s.call(BACKWARD, *args, outputs=3)
                with pytest.raises(errors.ResourceExhausted, match="quota"):
                    s.sync()
                assert s.download(Handle(fwd[0])).shape == (1, 1, 128, 1 << 14)
            [ok] = s.call("aten::add.Tensor", Handle(s.upload(torch.ones(3))), 1)
            assert torch.equal(s.download(ok), torch.full((3,), 2.0))


# ---- the C++ client (client/sdpa_choice.h is its choice too) ----

_NATIVE = r"""
import json, sys
import torch, torch.nn.functional as F
from gpupool.client.native import backend as nc
from gpupool.client.session import Session
from gpupool.client.engine import run_backward_on_calling_thread
torch.set_num_threads(1)
nc.load(); nc.claim(); run_backward_on_calling_thread()
session = Session.attach(sys.argv[1], sys.argv[2], timeout=120.0)
nc.connect(session, None)
dev = nc.device()
runs = {}
for fused in (True, False):
    torch.ops.gpupool_native.set_fused_sdp(fused)
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(2, 4, n, 8, generator=g).to(dev).requires_grad_() for n in (16, 12, 12)]
    nc.flush()
    session.seed(5)
    out = F.scaled_dot_product_attention(*xs, dropout_p=0.2)
    grads = torch.autograd.grad(out, xs, torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dev))
    after = torch.rand(16, device=dev)
    runs[fused] = [type(out.grad_fn).__name__] + [t.detach().cpu() for t in (out, *grads, after)]
a, b = runs[True], runs[False]
print(json.dumps({"nodes": [a[0], b[0]], "equal": [torch.equal(x, y) for x, y in zip(a[1:], b[1:])]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["serve", "old_daemon"])
def test_the_cpp_client_sends_dropout_fused_with_the_math_paths_bits(request: Any, daemon: str) -> None:
    """The C++ client sends the fused op with dropout where the daemon names "sdpa_dropout", else the math path
    (client/native/backend.py `connect` hands configure_wire the feature): the same bits either way."""
    import json
    import os
    import subprocess

    from gpupool.client.native.backend import compiler_missing

    why = compiler_missing()
    if why is not None:
        pytest.skip(f"C++ client: {why}")
    serve = request.getfixturevalue(daemon)
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _NATIVE, serve.address, serve.token()], env=env, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    fused = "ScaledDotProductFusedAttentionOverrideableBackward0" if daemon == "serve" else "UnsafeViewBackward0"
    assert result["nodes"] == [fused, "UnsafeViewBackward0"]
    assert result["equal"] == [True] * 5  # out, the three gradients, the next torch.rand
