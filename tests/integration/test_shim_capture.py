"""Step capture (`gpupool.torch.capture`) against a real daemon: N captured steps give the losses of eager
gpupool and of local CPU training (MLP, sentiment CNN, transformer encoder; SGD momentum, Adam, AdamW; dropout),
after recording every call is one command, and every broken assumption re-records or raises a clear error."""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.torch import runtime
from gpupool.client.torch.errors import RemoteError
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import gpupool.torch as gt
from examples.sentiment.model import build_model, make_batch
from gpupool._proto import device_pb2

capture_mod = importlib.import_module("gpupool.client.torch.capture")  # the module (the package exports the function)
Batch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def stock_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(500, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
        nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 1),
    )  # fmt: skip


def mlp_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(64, 500, generator=g), torch.randn(64, 1, generator=g)


def cnn() -> nn.Module:
    return build_model(vocab_size=1000, embed_dim=32, filters=64)  # dropout 0.5 (and embedding dropout)


def cnn_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return make_batch(batch_size=16, seq_len=32, vocab_size=1000, seed=i)


class Encoder(nn.Module):
    """A transformer encoder classifier: embedding, 2 layers (d 32, 4 heads, dropout 0.1), mean pool, linear."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def encoder_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + i)
    return torch.randint(0, 100, (4, 16), generator=g), torch.randint(0, 2, (4,), generator=g)


def sgd(params: Any, device: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def adam(params: Any, device: Any) -> torch.optim.Optimizer:
    if torch.device(device).type == "cpu":  # capturable is for accelerators; the math is the same
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.Adam(params, lr=torch.tensor(1e-3, device=device), capturable=True)


def adamw(params: Any, device: Any) -> torch.optim.Optimizer:
    if torch.device(device).type == "cpu":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=torch.tensor(1e-3, device=device), weight_decay=0.01, capturable=True)


def adam_fused(params: Any, device: Any) -> torch.optim.Optimizer:
    """torch's fused Adam (one `_fused_adam_` for the update; CPU has the kernel too), a device lr when remote."""
    lr = 1e-3 if torch.device(device).type == "cpu" else torch.tensor(1e-3, device=device)
    return torch.optim.Adam(params, lr=lr, fused=True)


def adamw_fused(params: Any, device: Any) -> torch.optim.Optimizer:
    lr = 1e-3 if torch.device(device).type == "cpu" else torch.tensor(1e-3, device=device)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)


def train(
    device: Any,
    model_fn: Callable[[], nn.Module],
    opt_fn: Callable[[Any, Any], torch.optim.Optimizer],
    batch: Batch,
    loss_fn: Callable[..., torch.Tensor],
    steps: int,
    captured: bool,
) -> tuple[list[float], Any]:
    torch.manual_seed(0)
    model = model_fn().to(device)
    opt = opt_fn(model.parameters(), device)
    torch.manual_seed(1)  # after init: dropout draws the same stream locally and on the daemon

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    fn = gt.capture(step) if captured else step
    losses = []
    for i in range(steps):
        x, y = batch(i)
        if not captured:
            x, y = x.to(device), y.to(device)
        losses.append(fn(x, y))  # kept as tensors: every replay's loss has a handle of its own
    return [float(v.item()) for v in losses], fn


def assert_close(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= 1e-5 * max(1.0, abs(w)), f"{what} step {i}: {g} vs {w}"


CASES = {
    "mlp-sgd": (stock_mlp, sgd, mlp_batch, nn.functional.mse_loss),
    "mlp-adam": (stock_mlp, adam, mlp_batch, nn.functional.mse_loss),
    "cnn-adam-dropout": (cnn, adam, cnn_batch, nn.functional.cross_entropy),
    "cnn-sgd-dropout": (cnn, sgd, cnn_batch, nn.functional.cross_entropy),
    # dropout in attention too: eager steps send the fused op's dropout composition (server/attention.py), a recorded
    # step torch's math path (client/torch/capture.py FUSED_DROPOUT_IN_GRAPHS), traced call by call
    "encoder-adamw-dropout": (Encoder, adamw, encoder_batch, nn.functional.cross_entropy),
    "mlp-adam-fused": (stock_mlp, adam_fused, mlp_batch, nn.functional.mse_loss),
    "encoder-adamw-fused-dropout": (Encoder, adamw_fused, encoder_batch, nn.functional.cross_entropy),
    # no dropout: eager and recorded steps take the fused attention (server/attention.py); the traced graph holds
    # its composition's aten calls (server/graph_trace.py `_ComposedOps`)
    "encoder-adamw-no-dropout": (lambda: Encoder(0.0), adamw, encoder_batch, nn.functional.cross_entropy),
}


def traced_lines(serve: Any) -> int:
    return sum("runs as a TorchScript graph" in line for line in list(serve.process.log_lines))


FUSED_OPS = {"aten::_scaled_dot_product_fused_attention_overrideable",
             "aten::_scaled_dot_product_fused_attention_overrideable_backward"}  # fmt: skip
# The captured steps whose graph holds the fused attention (a forward and a backward per encoder layer)
FUSED_CALLS = {"encoder-adamw-no-dropout": 4}


def fused_calls(step: Any) -> int:
    [g] = step.graphs.values()
    return sum(op.name.split(".")[0] in FUSED_OPS for op in g.built.ops)


@pytest.mark.parametrize("case", list(CASES))
def test_captured_losses_equal_eager_and_local(serve: Any, dev: torch.device, case: str) -> None:
    model_fn, opt_fn, batch, loss_fn = CASES[case]
    steps = 8
    local, _ = train("cpu", model_fn, opt_fn, batch, loss_fn, steps, captured=False)
    eager, _ = train(dev, model_fn, opt_fn, batch, loss_fn, steps, captured=False)
    traced = traced_lines(serve)
    captured, step = train(dev, model_fn, opt_fn, batch, loss_fn, steps, captured=True)
    assert step.stats == {"eager": 1, "recorded": 2, "replayed": steps - 3, "defined": 1, "rerecorded": 0}
    # replays 2-5 of the 5 ran as a TorchScript graph (server/graph_trace.py): the daemon logs it once per graph
    deadline = time.monotonic() + 10
    while traced_lines(serve) == traced and time.monotonic() < deadline:
        time.sleep(0.05)
    assert traced_lines(serve) == traced + 1
    fused = FUSED_CALLS.get(case, 0)
    assert fused_calls(step) == fused  # the recorded step took the fused attention (no math path while recording)
    [line] = [line for line in list(serve.process.log_lines) if "runs as a TorchScript graph" in line][traced:]
    assert f", {fused} fused attention;" in line  # ...and the daemon traced it, fused calls included
    assert_close(eager, local, f"{case} eager vs local")
    assert_close(captured, eager, f"{case} captured vs eager")
    assert len(set(captured[3:])) == steps - 3  # replays computed new losses (fresh batches), not stale ones


def defined_lines(serve: Any) -> list[str]:
    return [line for line in list(serve.process.log_lines) if " defined: " in line]


@pytest.mark.parametrize(
    "case, guards",
    [("encoder-adamw-dropout", 1), ("cnn-adam-dropout", 1), ("encoder-adamw-no-dropout", 1), ("mlp-adam", 0)],
)
def test_recorded_steps_with_dropout_and_embeddings_may_become_cuda_graphs(
    serve: Any, dev: torch.device, case: str, guards: int
) -> None:
    """What the clients record (dropout as random ops, attention with dropout as torch's math path, an embedding's
    backward guarded on the batch's indices) is what server/graph_cuda.py lets a CUDA graph hold: the daemon decides it
    at every graph's definition, on fake GPUs too, and says so in the definition's log line."""
    model_fn, opt_fn, batch, loss_fn = CASES[case]
    before = len(defined_lines(serve))
    train(dev, model_fn, opt_fn, batch, loss_fn, 4, captured=True)
    deadline = time.monotonic() + 10
    while len(defined_lines(serve)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = defined_lines(serve)[before:]
    assert f"a CUDA graph may hold it ({guards} value guards before each replay)" in line, line


def small_setup(dev: torch.device, **adam: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1)).to(dev)
    opt = torch.optim.Adam(model.parameters(), **(adam or {"lr": torch.tensor(1e-2, device=dev), "capturable": True}))
    return model, opt


def xy(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g)


def test_a_replay_is_one_command_and_runs_no_python(dev: torch.device) -> None:
    model, opt = small_setup(dev)
    calls = []

    @gt.capture
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for i in range(3):
        step(*xy(seed=i))
    rt = runtime.get(dev.index)
    assert rt is not None
    sent, misses = rt.ops_sent, gt.meta_cache.misses
    losses = [step(*xy(seed=10 + i)) for i in range(5)]
    assert rt.ops_sent - sent == 5 and gt.meta_cache.misses == misses
    assert len(calls) == 3  # eager, record, record: replays never call the function
    assert len({v.item() for v in losses}) == 5
    assert all(p.grad is not None and p.grad.abs().sum().item() > 0 for p in model.parameters())


def capture_small(dev: torch.device, **adam: Any) -> tuple[Any, nn.Module, torch.optim.Optimizer]:
    model, opt = small_setup(dev, **adam)

    def step(x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * scale
        loss.backward()
        opt.step()
        return loss

    return gt.capture(step), model, opt


def replaying(step: Any, *args: Any) -> Any:
    for _ in range(4):
        out = step(*args)
    assert step.state == "replay" and step.stats["replayed"] >= 1
    return out


@pytest.mark.parametrize(
    "change",
    ["shape", "dtype-of-scalar-arg", "scalar-arg", "training-flag", "lr-float", "parameter-replaced", "grad-dropped"],
)
def test_broken_assumptions_record_again(dev: torch.device, change: str) -> None:
    adam = {"lr": 1e-2, "capturable": True} if change == "lr-float" else {}
    step, model, opt = capture_small(dev, **adam)
    x, y = xy()
    replaying(step, x, y, 1.0)
    args: tuple[Any, ...] = (x, y, 1.0)
    if change == "shape":
        args = (*xy(n=6), 1.0)
    elif change == "dtype-of-scalar-arg":
        args = (x, y, 1)
    elif change == "scalar-arg":
        args = (x, y, 2.0)
    elif change == "training-flag":
        model.eval()
    elif change == "lr-float":
        opt.param_groups[0]["lr"] = 5e-3
    elif change == "parameter-replaced":
        with torch.no_grad():
            model[0].bias.data = torch.zeros(16, device=dev)
    elif change == "grad-dropped":
        model[3].weight.grad = None  # state the graph binds by identity (it was created in the step: re-bound)
    before = dict(step.stats)
    replaying(step, *args)
    if change == "grad-dropped":  # a gradient the step itself creates is re-created: no new recording
        assert step.stats["defined"] == before["defined"]
        return
    assert step.stats["defined"] == before["defined"] + 1  # a new key records a graph of its own...
    assert step.stats["rerecorded"] == before["rerecorded"] + (change == "parameter-replaced")  # ...or replaces one


def test_alternating_shapes_and_modes_replay_cached_graphs(dev: torch.device, caplog: pytest.LogCaptureFixture) -> None:
    step, model, _ = capture_small(dev)
    small, large = xy(n=4), xy(n=6)
    with caplog.at_level("DEBUG", logger="gpupool.torch"):
        replaying(step, *small)
        replaying(step, *large)
        model.eval()
        replaying(step, *small)
    model.train()
    recorded = step.stats["recorded"]
    for _ in range(3):
        step(*small)
        step(*large)
    assert step.stats["recorded"] == recorded and step.stats["defined"] == 3
    # the first graph defined and the first new one at INFO, the others at DEBUG (until round 53 a step whose batches
    # vary in shape logged a pair of INFO lines for each of its graphs: a dozen in the sentiment example's epoch)
    said = [(r.levelname, r.getMessage().split(": ", 1)[1]) for r in caplog.records]
    assert [(level, m.split()[0]) for level, m in said if m.startswith("graph ")] == [
        ("INFO", "graph"), ("DEBUG", "graph"), ("DEBUG", "graph")
    ], said  # fmt: skip
    assert [level for level, m in said if " records a new graph" in m] == ["INFO", "DEBUG"], said


def test_rerecorded_step_trains_like_eager(dev: torch.device) -> None:
    """After a re-record (a new batch size), captured losses still follow eager ones."""

    def run(captured: bool) -> list[float]:
        step, model, opt = capture_small(dev)
        fn = step if captured else step.fn
        out = []
        for i in range(10):
            x, y = xy(n=4 if i < 6 else 6, seed=i)
            if not captured:
                x, y = x.to(dev), y.to(dev)
            out.append(fn(x, y).item())
        return out

    torch.manual_seed(5)
    eager = run(False)
    torch.manual_seed(5)
    captured = run(True)
    assert_close(captured, eager, "re-recorded")


def sent_frames(rt: Any, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The frames the session sends from now on, each as its commands' kinds (`run_graph`, `free`, `sync`, ...)."""
    frames: list[list[str]] = []
    put = rt.session._put

    def spy(f: Any, *rest: Any) -> None:  # (rest: the queued size, `Session._put`)
        frame = f if isinstance(f, device_pb2.ClientFrame) else device_pb2.ClientFrame.FromString(f)
        frames.append([str(c.WhichOneof("cmd")) for c in frame.commands])
        put(f, *rest)

    monkeypatch.setattr(rt.session, "_put", spy)
    return frames


def test_replays_share_frames_and_held_ones_go_out_soon(dev: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replays travel several to a frame (one gRPC message and one hop to the worker for several steps):
    HOLD_STEPS after a sync, twice as many in each next frame while they come fast, up to HOLD_MAX_STEPS; a
    step held back goes out at a sync or, with nothing else to send it, after HOLD_SECONDS on its own, and the
    frames after a sync or after the timer sent one start small again."""
    step, _, _ = capture_small(dev)
    replaying(step, *xy())
    rt = runtime.get(dev.index)
    assert rt is not None
    rt.sync()
    frames = sent_frames(rt, monkeypatch)
    monkeypatch.setattr(capture_mod, "HOLD_SECONDS", 30.0)  # no timer flush during the count below
    first, most = capture_mod.HOLD_STEPS, capture_mod.HOLD_MAX_STEPS
    assert first < 2 * first <= most
    for _ in range(first + 2 * first + most + most):
        step(*xy())
    assert [f.count("run_graph") for f in frames] == [first, 2 * first, most, most]
    losses = [step(*xy()) for _ in range(3)]  # held: the sync of .item() sends them, in one frame with the sync
    assert losses[-1].item() > 0 and frames[4][:3] == ["run_graph"] * 3 and frames[4][-1] == "sync"
    for _ in range(first):  # after a sync the daemon has nothing queued: a small frame gets it going
        step(*xy())
    assert len(frames) == 6 and frames[5].count("run_graph") == first
    monkeypatch.setattr(capture_mod, "HOLD_SECONDS", 0.05)
    held = [step(*xy()) for _ in range(first + 2)]  # held (the limit is 2 * first now)
    assert held[-1].item() > 0 and len(frames) == 7  # the sync sends them; then their deadline passes
    time.sleep(0.2)
    assert len(frames) == 7
    monkeypatch.setattr(capture_mod, "HOLD_SECONDS", 30.0)
    for _ in range(first):  # the timer, woken after the sync, took nothing from it: frames start small again
        step(*xy())
    assert len(frames) == 8 and frames[7].count("run_graph") == first
    frames[6:] = []
    monkeypatch.setattr(capture_mod, "HOLD_SECONDS", 0.001)
    step(*xy())  # arms the timer (the previous deadline has long passed)
    deadline = time.monotonic() + 10
    while len(rt.session._frame.commands) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(frames) == 7 and frames[6] == ["run_graph"] and not len(rt.session._frame.commands)
    monkeypatch.setattr(capture_mod, "HOLD_SECONDS", 30.0)
    for _ in range(first):  # sent by the timer: steps come slowly, frames start from HOLD_STEPS again
        step(*xy())
    assert len(frames) == 8 and frames[7].count("run_graph") == first


def plain_setup(dev: torch.device) -> tuple[nn.Module, Any]:
    """A model without dropout and its capturable Adam (the same numbers on every run), and its step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2, device=dev), capturable=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return model, step


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().cpu() for p in model.parameters()]


def test_an_error_in_a_held_step_reaches_the_next_sync_and_later_steps_run_on_sound_state(
    dev: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step k of a held frame fails on the daemon (its input is a poisoned tensor: an op that failed): the first
    sync after the frame raises k's error, k's loss stays poisoned, and the frame's later steps ran on the state
    the steps before k left (a failed replay writes nothing the next one reads): the parameters end as an eager
    run of the same steps without k leaves them, and so do the later steps' losses."""
    monkeypatch.setattr(capture_mod, "HOLD_SECONDS", 30.0)  # the frame goes out at the sync only
    batches = [xy(seed=50 + i) for i in range(12)]
    src = torch.zeros(10, 8)

    def run(captured: bool, bad: int) -> tuple[list[Any], nn.Module, Any]:
        model, step = plain_setup(dev)
        fn = gt.capture(step) if captured else step
        for _ in range(3):  # eager, two recordings: replays from here on
            fn(*[t.to(dev) for t in batches[0]])
        rt = runtime.get(dev.index)
        assert rt is not None
        rt.sync()
        poisoned: Any = None
        if captured:  # the daemon refuses index 99 of 10 rows: the result (x's shape) is poisoned
            poisoned = src.to(dev).index_select(0, torch.tensor([0, 1, 2, 99], device=dev))
            with pytest.raises(RemoteError, match="index out of range"):
                rt.sync()  # its own error is raised (and done with) here: what the frame raises is step k's
        frames = sent_frames(rt, monkeypatch)
        losses: list[Any] = []
        for i in range(1, 12):
            x, y = (t.to(dev) for t in batches[i])
            if i == bad and not captured:
                losses.append(None)  # the reference skips it
                continue
            losses.append(fn(poisoned if i == bad else x, y))
        return losses, model, frames

    bad = 6
    want, ref_model, _ = run(False, bad)
    want_values = [v.item() if v is not None else None for v in want]
    got, model, frames = run(True, bad)
    assert all(f.count("run_graph") >= 2 for f in frames)  # steps before and after the bad one shared frames
    with pytest.raises(RemoteError, match="index out of range") as first:
        got[0].item()  # the first sync after the frame: the error of step `bad` (its input's poison)
    assert first.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(RemoteError, match="index out of range"):
        got[bad - 1].item()  # its own loss is poisoned by it
    for i, (g, w) in enumerate(zip(got, want_values, strict=True)):
        if w is not None:
            assert abs(g.item() - w) <= 1e-5 * max(1.0, abs(w)), f"step {i + 1}: {g.item()} vs {w}"
    for a, b in zip(params_of(model), params_of(ref_model), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_frees_between_held_steps(dev: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frees that travel between held steps (losses dropped, a gradient set to None) run where they were sent:
    the steps after them train exactly like eager steps, and the frame keeps filling around them."""
    monkeypatch.setattr(capture_mod, "HOLD_SECONDS", 30.0)
    batches = [xy(seed=70 + i) for i in range(14)]

    def run(captured: bool) -> tuple[list[float], nn.Module, list[list[str]]]:
        model, step = plain_setup(dev)
        fn = gt.capture(step) if captured else step
        rt = runtime.get(dev.index)
        assert rt is not None
        frames: list[list[str]] = []
        kept = []
        for i, (x, y) in enumerate(batches):
            if i == 3:
                rt.sync()
                frames = sent_frames(rt, monkeypatch)
            loss = fn(x.to(dev), y.to(dev))
            if i % 2:
                kept.append(loss)
            del loss  # every other loss dies at once
            if i == 8:
                model[2].weight.grad = None  # a gradient the graph leaves behind, dropped between held steps
            rt.flush_frees(force=True)  # their Free goes into the held frame now, between two steps
        return [float(v.item()) for v in kept], model, frames

    want, ref_model, _ = run(False)
    got, model, frames = run(True)
    assert_close(got, want, "frees between held steps")
    for a, b in zip(params_of(model), params_of(ref_model), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(map(free_between_steps, frames)), frames  # a Free went out in a frame of held steps, inside it


def free_between_steps(kinds: list[str]) -> bool:
    runs = [i for i, k in enumerate(kinds) if k == "run_graph"]
    return len(runs) >= 2 and "free" in kinds[runs[0] : runs[-1]]


SCALE = 1.0  # a module global the step of the next test reads


def test_python_values_the_step_reads_are_guarded(dev: torch.device) -> None:
    """A closure number and a global the step reads change after its graph was defined: the step records again
    (a replay would repeat the old values) and trains like eager. A counter it reads that changes every call
    without changing what it computes stops being watched, and the step keeps replaying."""
    global SCALE

    def run(captured: bool) -> tuple[list[float], Any]:
        global SCALE
        model, opt = small_setup(dev)
        shift, calls = 0.0, 0

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x) + shift, y) * SCALE
            loss.backward()
            opt.step()
            return loss

        fn = gt.capture(step) if captured else step
        out = []
        for i in range(16):
            shift = 0.5 if i >= 8 else 0.0
            SCALE = 2.0 if i >= 12 else 1.0
            x, y = xy(seed=i)
            if not captured:
                x, y = x.to(dev), y.to(dev)
            out.append(fn(x, y).item())
        return out, fn

    try:
        torch.manual_seed(3)
        eager, _ = run(False)
        torch.manual_seed(3)
        captured, step = run(True)
    finally:
        SCALE = 1.0
    assert_close(captured, eager, "python values")
    assert "calls" not in step.values and {"shift", "SCALE"} <= set(step.values)
    assert step.stats["defined"] == 3 and step.stats["replayed"] >= 6


def test_changing_python_scalars_are_detected(dev: torch.device) -> None:
    # Default Adam computes its bias corrections in Python from a CPU step count: new floats every step, which a
    # replay would repeat stale. The recordings differ, and capture says so (and how to fix it).
    step, _, _ = capture_small(dev, lr=1e-2)
    x, y = xy()
    with pytest.raises(gt.CaptureError, match="capturable=True"):
        for _ in range(6):
            step(x, y)


@pytest.mark.parametrize("sync", ["item", "cpu", "print", "nonzero", "manual_seed"])
def test_sync_inside_a_captured_step_is_an_error(dev: torch.device, sync: str) -> None:
    model, opt = small_setup(dev)

    @gt.capture
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        if sync == "item":
            loss.item()
        elif sync == "cpu":
            loss.cpu()
        elif sync == "print":
            str(loss)
        elif sync == "nonzero":
            (x > 0).nonzero()
        else:
            torch.manual_seed(3)
        loss.backward()
        return loss

    x, y = xy()
    step(x, y)  # eager: fine
    with pytest.raises(gt.CaptureError, match="inside a step being captured"):
        step(x, y)
    assert torch.zeros(2, device=dev).sum().item() == 0.0  # the device is fine


@pytest.mark.parametrize("update, step", [("lazy", "lazy_train_step"), ("dense", "train_step")])
def test_sentiment_train_py_with_capture(
    dev: torch.device, tmp_path: Any, caplog: pytest.LogCaptureFixture, update: str, step: str
) -> None:
    """`examples/sentiment/train.py --capture` on a small synthetic aclImdb, with each --embedding-update: it trains,
    and its steps replay."""
    import json
    import logging
    import re

    from examples.sentiment import fake_data, train

    tarball = fake_data.write_tarball(tmp_path / "aclImdb_v1.tar.gz", per_class=100)
    out = tmp_path / "model"
    argv = ["--device", "gpupool", "--capture", "--epochs", "1", "--limit", "200", "--batch-size", "20",
            "--embed-dim", "16", "--filters", "16", "--bigram-buckets", "0", "--max-len", "128", "--data",
            str(tarball), "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress",
            "--log-every", "0", "--embedding-update", update]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="sentiment"), caplog.at_level(logging.DEBUG, logger="gpupool.torch"):
        assert train.main(argv) == 0
    (epoch,) = json.loads((out / "config.json").read_text())["results"]["history"]
    assert 0.0 < epoch["train_loss"] < 1.0
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    defined = [level for level, m in said if f"defined for {step}:" in m]
    new = [level for level, m in said if f"{step} records a new graph" in m]
    # one INFO line of each, the rest at DEBUG, and their count at the end (until round 53 the lazy step logged a
    # pair of INFO lines for each of its graphs: a dozen on the 5,000-review sample)
    assert defined[0] == logging.INFO and set(defined[1:]) <= {logging.DEBUG}, said
    assert new[:1] in ([], [logging.INFO]) and set(new[1:]) <= {logging.DEBUG}, said
    (summary,) = [m for _, m in said if m.startswith("captured step: ")]
    counts = re.fullmatch(r"captured step: (\d+) graph\(s\) recorded, \d+ step\(s\) replayed \(\d+ recorded, 1 eager\)",
                          summary)  # fmt: skip
    assert counts is not None and int(counts[1]) == len(defined), summary


def _sentiment_lazy(dev: torch.device, captured: bool, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """train.py's step with its default lazy embedding update (LazyAdam on the rows a batch reads) and the EMA:
    eager as train.py runs it without --capture (rows unpadded, Python bias corrections), or as --capture does."""
    from examples.sentiment import train
    from examples.sentiment.lazy import LazyAdam

    torch.manual_seed(0)
    model = build_model(vocab_size=300, embed_dim=16, filters=8, bigram_buckets=500, embed_dropout=0.5).to(dev)
    lr: Any = torch.tensor(1e-2, device=dev) if captured else 1e-2
    lazy = LazyAdam(model.embedding_tables(), capturable=captured)
    tables = {id(p) for p in model.embedding_tables()}
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in tables], lr=lr, capturable=captured)
    average = train.WeightAverage(model, 0.9, lazy_tables=model.embedding_tables(), capturable=captured)
    step = train.make_train_step(model, opt, average, captured, lazy)
    torch.manual_seed(1)  # after init: the same dropout stream for both
    losses = []
    for x, y in batches:
        sparse = model.sparse_batch(x, fixed=captured).to(dev)
        losses.append(step(x.to(dev), y.to(dev), sparse)[0])
    average.swap()  # the averages, the tables' caught up
    return [float(v.item()) for v in losses], model, step


def test_sentiment_lazy_embedding_update_captures_and_stays_sparse(dev: torch.device) -> None:
    """train.py --capture keeps the default lazy embedding update (round 49; it used to switch to torch's dense Adam
    over the whole tables, slower than eager on a fake GPU): the replayed steps give eager's losses and weights, the
    rows no batch read keep their weights, and no op of the graph takes a table-sized gradient. With train.py's EMA of
    the weights, whose tables' rows move only when read (round 49 too): the model holds the averages at the end. The
    average warms up under capture as in eager (round 50: its decay (1 + n) / (10 + n) computed on the device; until
    then --capture turned the warm-up off, and its average of aclImdb's first epoch tested 5.6 points below eager's)."""
    batches = [make_batch(batch_size=6, seq_len=16 if i % 3 else 24, vocab_size=120, seed=i) for i in range(9)]
    eager, eager_model, _ = _sentiment_lazy(dev, False, batches)
    captured, model, step = _sentiment_lazy(dev, True, batches)
    stats = step.captured.stats
    assert stats["defined"] == 2 and stats["replayed"] == 9 - 1 - 4, stats  # two shapes, each recorded twice
    assert_close(captured, eager, "sentiment lazy captured vs eager")
    for (name, a), b in zip(eager_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b.cpu(), a.cpu(), rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    unread = torch.ones(300, dtype=torch.bool)
    for x, _ in batches:
        unread[x.flatten()] = False
    words = model.embedding.weight.detach().cpu()
    torch.manual_seed(0)
    start = build_model(vocab_size=300, embed_dim=16, filters=8, bigram_buckets=500, embed_dropout=0.5)
    assert int(unread.sum()) > 100 and torch.equal(words[unread], start.embedding.weight.detach()[unread])
    for g in step.captured.graphs.values():  # the graph's embedding gradients are of the batch's rows, not the tables'
        backward = [op for op in g.built.ops if op.name == "aten::embedding_dense_backward"]
        assert len(backward) == 2  # words and bigrams
        assert all(op.args[2].i <= 6 * 24 + 1 for op in backward), backward  # num_weights: padded rows + the zero row


def test_torch_compile_on_a_gpupool_model_trains_like_eager(dev: torch.device) -> None:
    """torch.compile cannot trace a Python device backend; on a gpupool model it runs the ops eagerly (a graph
    break at the device's dispatch), with eager's results and without Dynamo tracing into the shim."""
    import warnings

    def run(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        f = torch.compile(model) if compiled else model
        out = []
        for i in range(3):
            x, y = xy(seed=i)
            opt.zero_grad()
            loss = nn.functional.mse_loss(f(x.to(dev)), y.to(dev))
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = run(True)
    assert compiled == run(False)
    assert not [w for w in caught if "Dynamo" in str(w.message)], [str(w.message)[:200] for w in caught]
    torch._dynamo.reset()


class Lstm(nn.Module):
    """An LSTM classifier: torch sends a fake GPU `aten::_thnn_fused_lstm_cell` (no CPU kernel: server/fallbacks.py
    runs its CPU equivalent) and `aten::unbind` (a list result); plus a `chunk` of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lstm(x)[0][:, -1].chunk(2, dim=1)
        return self.head(a * b)


def lstm_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(300 + i)
    return torch.randn(4, 5, 8, generator=g), torch.randint(0, 2, (4,), generator=g)


def test_captured_lstm_with_list_results_trains_like_eager(dev: torch.device) -> None:
    """A graph took neither ops with a list result (`check_counts` ran their count on no arguments: "bad arguments
    for aten::unbind") nor accelerator-only ops on a fake GPU (no CPU kernel: the eager path's fallbacks were not
    the graph's)."""
    steps = 6
    local, _ = train("cpu", Lstm, sgd, lstm_batch, nn.functional.cross_entropy, steps, captured=False)
    eager, _ = train(dev, Lstm, sgd, lstm_batch, nn.functional.cross_entropy, steps, captured=False)
    captured, step = train(dev, Lstm, sgd, lstm_batch, nn.functional.cross_entropy, steps, captured=True)
    assert step.stats == {"eager": 1, "recorded": 2, "replayed": steps - 3, "defined": 1, "rerecorded": 0}
    assert_close(eager, local, "lstm eager vs local")
    assert_close(captured, eager, "lstm captured vs eager")


class _OnMeta(TorchDispatchMode):
    """Logs the ops dispatched in this thread (dispatch modes are per thread) and runs them on meta copies: nothing
    reaches the daemon, so a thread may look at what its SDPA would send while another thread records a step."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))

        def meta(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
            return torch.device("meta") if isinstance(x, torch.device) else x

        a, k = tree_map(meta, (args, kwargs or {}))
        return func(*a, **k)


def test_a_recording_step_leaves_other_threads_attention_fused(dev: torch.device) -> None:
    """While one thread records a step, another thread's scaled_dot_product_attention on gpupool still takes the
    fused op (recording once turned the fused backend off process-wide: other threads took the math path), with
    dropout too (a recording thread's calls with dropout take the math path: native_guard.cpp `t_capturing` is per
    thread)."""
    q, k, v = (torch.randn(2, 4, 16, 8).to(dev) for _ in range(3))
    inside, seen = threading.Event(), threading.Event()
    sent: list[list[str]] = []

    def other() -> None:
        for _ in range(3):  # the step's calls: eager, record, record
            assert inside.wait(60)
            inside.clear()
            with _OnMeta() as log:
                nn.functional.scaled_dot_product_attention(q, k, v)
                nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
            sent.append(log.ops)
            seen.set()

    thread = threading.Thread(target=other)
    thread.start()
    model, opt = small_setup(dev)

    @gt.capture
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        inside.set()
        assert seen.wait(60)
        seen.clear()
        loss.backward()
        opt.step()
        return loss

    for i in range(3):
        step(*xy(seed=i))
    thread.join(60)
    assert step.stats["recorded"] == 2
    assert sent == [["aten._scaled_dot_product_fused_attention_overrideable.default"] * 2] * 3


class EagerWorker(threading.Thread):
    """A thread doing eager work on a gpupool device (uploads, a held-back empty filled by a copy, a lazy view,
    .item(), .cpu()) in rounds, each checked against its exact value, until stopped; `call(fn)` runs fn on this
    thread between rounds and waits for it (the captured step uses it to put this thread's commands at a known
    point of its recording)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(daemon=True)
        self.device = device
        self.tasks: list[tuple[Callable[[], None], threading.Event]] = []
        self.cond = threading.Condition()
        self.rounds = 0
        self.stopping = False
        self.errors: list[BaseException] = []
        self.left: torch.Tensor | None = None

    def one_round(self) -> None:
        n = 64
        a = torch.arange(n, dtype=torch.float32, device=self.device)
        e = torch.empty(n, device=self.device)  # held back, then one upload (remote.copy_into)
        e.copy_(torch.full((n,), 2.0))
        assert (a * e + 1).sum().item() == n * (n - 1) + n
        assert a[8:16].sum().item() == sum(range(8, 16))  # a lazy view (no record), then a sync
        assert a.cpu().tolist() == list(range(n))  # a read-back

    def leave_empty(self) -> None:
        """A held-back empty of this thread, left unsent: the next command of the recording thread sends it
        (unrecorded: it is no op of the step)."""
        self.left = torch.empty(32, device=self.device)

    def use_empty(self) -> None:
        assert self.left is not None
        self.left.fill_(3.0)
        assert self.left.sum().item() == 96.0

    def run(self) -> None:
        try:
            while True:
                with self.cond:
                    if self.stopping:
                        return
                    task = self.tasks.pop(0) if self.tasks else None
                if task is not None:
                    task[0]()
                    task[1].set()
                    continue
                self.one_round()
                with self.cond:
                    self.rounds += 1
                    self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - the test thread reports it
            self.errors.append(exc)

    def call(self, fn: Callable[[], None]) -> None:
        done = threading.Event()
        with self.cond:
            self.tasks.append((fn, done))
        while not done.wait(0.05):
            assert self.is_alive(), f"the eager thread failed: {self.errors!r}"

    def another_round(self) -> None:
        """Wait until a whole round ran after this call (its commands follow what this thread sent so far)."""
        with self.cond:
            target = self.rounds + 2
            while self.rounds < target:
                assert self.cond.wait(60) or self.rounds >= target
                assert self.is_alive(), f"the eager thread failed: {self.errors!r}"

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
        self.join(60)
        assert not self.errors, self.errors


def train_with_neighbour(dev: torch.device, worker: EagerWorker | None) -> tuple[list[float], Any]:
    """8 calls of a captured step (eager, 2 recordings, 5 replays); with `worker`, its eager thread works on a
    device meanwhile: inside both recordings at fixed points and between the replays (and whenever it likes)."""
    model, opt = small_setup(dev)  # dropout: the daemon's random stream must be the same with the neighbour
    hook = worker.call if worker is not None else lambda fn: None

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        t = torch.empty(x.shape, device=x.device)  # held back: an op of this recording, whoever sends first
        hook(worker.one_round if worker else None)  # uploads, syncs and read-backs of another thread
        hook(worker.leave_empty if worker else None)
        t.copy_(x)  # sends this step's empty (recorded) and the other thread's (not recorded)
        loss = nn.functional.mse_loss(model(t), y)
        hook(worker.use_empty if worker else None)
        loss.backward()
        opt.step()
        return loss

    captured = gt.capture(step)
    if worker is not None:
        worker.start()
    losses = []
    for i in range(8):
        losses.append(captured(*xy(seed=i)))
        if worker is not None:
            worker.another_round()
    values = [v.item() for v in losses]
    if worker is not None:
        worker.stop()
    return values, captured


@pytest.mark.parametrize("where", ["same device", "other device"])
def test_other_threads_work_on_while_a_step_records_and_replays(attach: Any, where: str) -> None:
    """Only the recording thread's commands are recorded: another thread's eager ops, uploads, held-back empties,
    syncs and read-backs on the same device (or another) during both recordings and the replays run eagerly with
    their right values, are neither recorded nor refused, and the captured step's losses and graph are the same
    as without that thread (once, every thread's commands on the device were recorded and its syncs refused)."""
    dev = attach()
    alone, step_alone = train_with_neighbour(dev, None)
    worker = EagerWorker(dev if where == "same device" else attach())
    beside, step_beside = train_with_neighbour(dev, worker)
    assert worker.rounds >= 8
    assert step_beside.stats == step_alone.stats == {
        "eager": 1, "recorded": 2, "replayed": 5, "defined": 1, "rerecorded": 0,
    }  # fmt: skip
    [g_alone], [g_beside] = step_alone.graphs.values(), step_beside.graphs.values()
    assert g_beside.ops == g_alone.ops
    assert [op.name for op in g_beside.built.ops] == [op.name for op in g_alone.built.ops]
    assert g_beside.built.ops[0].name == "aten::empty.memory_format"  # the step's own empty, recorded
    assert len(g_beside.built.persistent) == len(g_alone.built.persistent)
    assert beside == alone  # bit-equal
    assert len(set(alone)) == 8
