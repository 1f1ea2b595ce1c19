"""Training through the gpupool device against a real daemon: losses equal local ones from the same seed,
and the pieces a training script touches (factories, sync points, state_dict + torch.save, DataLoader,
data-dependent shapes, manual_seed, foreach optimizers) behave as on a local device."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from gpupool.client.torch import runtime
from gpupool.client.torch.tensor import RemoteTensor
from support import daemon_status
from torch import nn

import gpupool.torch as gt
from examples.sentiment.model import build_model, make_batch
from gpupool.tokens import public_session_id


def stock_mlp() -> nn.Module:
    """The MLP of the stock-prediction example: 500 -> 1024 -> 512 -> 256 -> 128 -> 1, ReLU."""
    return nn.Sequential(
        nn.Linear(500, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
        nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 1),
    )  # fmt: skip


def train_mlp(device: torch.device | str, steps: int) -> list[float]:
    torch.manual_seed(0)
    return train_adam(device, stock_mlp(), steps, (256, 500), (256, 1), seed=1)


def train_adam(
    device: torch.device | str,
    model: nn.Module,
    steps: int,
    x_shape: tuple[int, ...],
    y_shape: tuple[int, ...],
    seed: int,
) -> list[float]:
    """`steps` Adam steps of `model` on `device` (MSE on random batches of the given shapes); the losses."""
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(*x_shape, generator=data)
        y = torch.randn(*y_shape, generator=data)
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_cnn(device: torch.device | str, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = build_model(vocab_size=1000, embed_dim=32, filters=64).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(1)  # after init: dropout draws from the same stream locally and on the daemon
    losses = []
    for step in range(steps):
        tokens, labels = make_batch(batch_size=32, seq_len=48, vocab_size=1000, seed=step)
        tokens, labels = tokens.to(device), labels.to(device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_losses_close(remote: list[float], local: list[float]) -> None:
    assert len(remote) == len(local)
    for i, (r, l_) in enumerate(zip(remote, local, strict=True)):
        assert abs(r - l_) <= 1e-5 * abs(l_), f"step {i}: gpupool {r} vs local {l_}"


def test_stock_mlp_20_steps_match_local(dev: torch.device) -> None:
    local = train_mlp("cpu", 20)
    before = gt.meta_cache.misses
    remote = train_mlp(dev, 20)
    assert_losses_close(remote, local)
    assert local[-1] < local[0]
    # After the first step every op signature is cached: later steps pay no meta inference.
    first_step_misses = gt.meta_cache.misses - before
    train_mlp(dev, 3)
    assert gt.meta_cache.misses - before == first_step_misses


def test_sentiment_cnn_10_steps_match_local(dev: torch.device) -> None:
    local = train_cnn("cpu", 10)
    remote = train_cnn(dev, 10)
    assert_losses_close(remote, local)


def adam_step_ops(dev: torch.device, **adam: Any) -> int:
    rt = runtime.get(dev.index)
    assert rt is not None
    model = stock_mlp().to(dev)
    opt = torch.optim.Adam(model.parameters(), **adam)
    x = torch.randn(4, 500).to(dev)
    model(x).sum().backward()
    opt.step()  # the first step also creates the optimizer state
    model(x).sum().backward()
    sent = rt.ops_sent
    opt.step()
    return rt.ops_sent - sent


def test_adam_step_takes_the_foreach_path(dev: torch.device) -> None:
    # Nobody asks for foreach, yet a step is a handful of list ops (7 for Adam), not ~9 single-tensor
    # ops per parameter (10 parameters here) as with foreach=False.
    default = adam_step_ops(dev)
    assert default <= 10
    assert adam_step_ops(dev, foreach=False) >= 5 * default


def train_deep(device: torch.device | str, steps: int) -> list[float]:
    """150 linear layers: 300 parameters, so Adam's `_foreach_` ops return more tensors than a compact record
    names (a u8 count of outputs): `_foreach_sqrt` of 300 tensors raised struct.error in the client."""
    torch.manual_seed(0)
    return train_adam(device, nn.Sequential(*(nn.Linear(4, 4) for _ in range(150))), steps, (8, 4), (8, 4), seed=2)


def test_adam_over_more_parameters_than_a_record_names_matches_local(dev: torch.device) -> None:
    assert_losses_close(train_deep(dev, 3), train_deep("cpu", 3))


def test_a_cpu_tensor_to_gpupool_is_one_upload(dev: torch.device) -> None:
    """x.to("gpupool") of a contiguous CPU tensor sends no op (the upload is the new tensor); other layouts, dtype
    changes and autograd keep their meaning."""
    rt = runtime.get(dev.index)
    assert rt is not None
    x = torch.randn(4, 5)
    sent = rt.ops_sent
    y = x.to(dev)
    assert rt.ops_sent == sent and torch.equal(y.cpu(), x)
    z = x.t().to(dev)  # not contiguous: the generic path (upload, then _to_copy on the daemon)
    assert rt.ops_sent > sent and torch.equal(z.cpu(), x.t())
    w = x.to(dev, torch.float64)
    assert w.dtype == torch.float64 and torch.equal(w.cpu(), x.double())
    g = torch.randn(3, requires_grad=True)
    (g.to(dev) * 2).sum().backward()
    assert g.grad is not None and torch.equal(g.grad, torch.full((3,), 2.0))


def test_factories_sync_points_and_printing(dev: torch.device) -> None:
    z = torch.zeros(2, 3, device=dev)
    assert z.device == dev and z.sum().item() == 0.0
    a = torch.arange(6, device=dev).reshape(2, 3)
    assert a.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert bool((a > 4).any()) and not bool((a > 5).any())
    assert torch.equal(a.cpu(), torch.arange(6).reshape(2, 3))
    assert "device='gpupool:" in repr(a) and "[3, 4, 5]" in str(a)
    f = torch.full((2,), 2.5, device=dev) * torch.ones(2, device=dev)
    assert f.cpu().tolist() == [2.5, 2.5]
    with torch.no_grad():
        w = torch.randn(3, 3).to(dev)
        w.t_()
        assert w.stride() == (1, 3)
        assert torch.equal(w.cpu(), w.cpu().contiguous())


def test_data_dependent_shapes_round_trip(dev: torch.device) -> None:
    x = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, -1.0]])
    r = x.to(dev)
    assert torch.equal(torch.nonzero(r).cpu(), torch.nonzero(x))
    assert torch.equal(r[r > 0].cpu(), x[x > 0])
    assert torch.equal(torch.unique(r).cpu(), torch.unique(x))
    # Results keep working as ordinary remote tensors.
    assert (r[r > 0] * 2).sum().item() == pytest.approx(7.0)


def test_manual_seed_reaches_the_daemon(dev: torch.device) -> None:
    torch.manual_seed(123)
    a = torch.randn(5, device=dev).cpu()
    torch.manual_seed(123)
    b = torch.randn(5, device=dev).cpu()
    c = torch.randn(5, device=dev).cpu()
    assert torch.equal(a, b) and not torch.equal(b, c)
    torch.manual_seed(123)
    assert torch.equal(a, torch.randn(5))  # a fake GPU draws exactly what the CPU draws


def test_state_dict_save_and_load(dev: torch.device) -> None:
    torch.manual_seed(0)
    model = stock_mlp().to(dev)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf)  # back on the device it was saved from, as a CUDA checkpoint on a GPU machine
    assert all(t.device == dev for t in loaded.values())
    buf.seek(0)
    on_cpu = torch.load(buf, map_location="cpu")
    assert all(t.device.type == "cpu" and type(t) is torch.Tensor for t in on_cpu.values())
    torch.manual_seed(0)
    assert all(torch.equal(on_cpu[k], v) for k, v in stock_mlp().state_dict().items())
    other = stock_mlp().to(dev)
    other.load_state_dict(loaded)
    x = torch.randn(3, 500)
    assert torch.allclose(other(x.to(dev)).cpu(), model(x.to(dev)).cpu())
    back = model.to("cpu")
    assert all(type(p) is nn.Parameter and p.device.type == "cpu" for p in back.parameters())


def test_dataloader_batches_and_eval_no_grad(dev: torch.device) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(40, 500), torch.randn(40, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    model = stock_mlp().to(dev)
    model.eval()
    seen = 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x.to(dev))
            assert out.device == dev and not out.requires_grad
            assert out.shape == y.shape
            seen += out.shape[0]
    assert seen == 40


def test_dead_tensors_are_freed(dev: torch.device) -> None:
    rt = runtime.get(dev.index)
    assert rt is not None
    for _ in range(600):
        t = torch.ones(1000, device=dev) * 2  # each iteration drops the previous tensors
    del t
    gt.synchronize()
    assert not rt._dead  # a sync point flushes the queued frees
    status = daemon_status(rt.session._stub, rt.session)
    mine = [s for s in status.sessions if s.session_id == public_session_id(rt.session.session_id)]
    assert mine and mine[0].used_bytes < 100 * 4000


def test_data_assignment_and_dtype_conversion_follow_the_handle(dev: torch.device) -> None:
    x = torch.arange(4.0).to(dev)
    x.data = torch.arange(4.0).to(dev) * 10  # no op travels: the tensor must now name the new daemon tensor
    assert x.cpu().tolist() == [0.0, 10.0, 20.0, 30.0]
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(dev)
    weight = model.weight
    model.double()  # Module._apply assigns .data of the existing parameters
    assert model.weight is weight and model.weight.dtype == torch.float64
    torch.manual_seed(0)
    assert torch.equal(model.weight.cpu(), nn.Linear(3, 2).double().weight.detach())
    out = model(torch.ones(1, 3, dtype=torch.float64).to(dev))
    assert out.dtype == torch.float64 and out.shape == (1, 2)


def test_a_dying_tensor_counts_its_bytes_without_asking_torch(dev: torch.device, monkeypatch: Any) -> None:
    """Its death queues its handle and its bytes (what steers an early Free) from the tensor's own key: the
    tensor methods that used to count them (~1-2 us on every death) are not called, so here they raise."""
    rt = runtime.get(dev.index)
    assert rt is not None
    gt.synchronize()
    a = torch.ones(16, 64, device=dev)
    b = torch.zeros(3, 5, dtype=torch.float64, device=dev)
    ha, hb = a._gp_h, b._gp_h
    dead0, bytes0 = len(rt._dead), rt._dead_bytes

    def refuse(*_: Any) -> Any:
        raise AssertionError("tensor metadata read in __del__")

    for name in ("nelement", "numel", "element_size"):
        monkeypatch.setattr(RemoteTensor, name, refuse)
    del a, b
    assert rt._dead[dead0:] == [ha, hb]
    assert rt._dead_bytes - bytes0 == 16 * 64 * 4 + 3 * 5 * 8


def test_threads_waiting_at_once_each_read_their_own_replies(dev: torch.device) -> None:
    """The thread that waits reads the reply stream (no reader thread): two threads syncing and downloading at
    the same time on one session take turns reading, and each gets exactly its own answers."""
    import threading

    rt = runtime.get(dev.index)
    assert rt is not None
    tensors = [torch.full((256,), float(i), device=dev) for i in range(2)]
    handles = [t._gp_h for t in tensors]
    gt.synchronize()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(40):
                rt.session.sync()
                got = rt.session.download(handles[i])
                assert torch.equal(got, torch.full((256,), float(i))), (i, got[:3])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert float(tensors[1].sum().item()) == 256.0


@pytest.mark.parametrize("act", [nn.SiLU(), nn.Mish()], ids=["silu", "mish"])
def test_silu_and_mish_gradients_are_the_kernels_bit_for_bit(dev: torch.device, act: nn.Module) -> None:
    """`silu_backward` and `mish_backward` have a CompositeImplicitAutograd kernel (for backends without one) besides
    their CPU and CUDA kernels: the shim sends them whole (meta.KERNEL_OVER_COMPOSITE, a PrivateUse1 kernel in
    backend.py), so their gradients are the kernel's, as on the CPU, on CUDA and on the C++ client. Until round 39 torch
    decomposed them for the shim into five rounded ops: in bfloat16 another gradient (a Llama-style SwiGLU block under
    autocast trained apart on the two clients)."""
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float32):
        x, w = torch.randn(2, 256, generator=g).to(dtype)
        local = x.clone().requires_grad_()
        (act(local) * w).sum().backward()
        remote = x.to(dev).requires_grad_()
        (act(remote) * w.to(dev)).sum().backward()
        assert local.grad is not None and remote.grad is not None
        assert torch.equal(remote.grad.cpu(), local.grad), dtype
