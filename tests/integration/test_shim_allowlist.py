"""The daemon's op allowlist (server/allowed_ops.txt) covers what the shim sends for real models: the ops the
shim tests' models (stock MLP, sentiment CNN, Adam/SGD steps, eval, factories) send through a real daemon are
recorded at the client and each must be on the list. A new model op that is not allowed fails here by name."""

from __future__ import annotations

from typing import Any

import test_shim_training as training
import torch
from gpupool.client.session import Session
from gpupool.server.ops import load_allowlist


def _canonical(name: str) -> str:
    return name if "." in name.removeprefix("aten::") else name + ".default"


def test_ops_of_the_shim_tests_models_are_allowed(dev: torch.device, monkeypatch: Any) -> None:
    sent: set[str] = set()
    real_op = Session.op

    def recording(self: Session, name: str, *args: Any, **kwargs: Any) -> Any:
        sent.add(_canonical(name))
        return real_op(self, name, *args, **kwargs)

    monkeypatch.setattr(Session, "op", recording)
    training.train_mlp(dev, 2)
    training.train_cnn(dev, 2)
    training.adam_step_ops(dev)
    model = torch.nn.Linear(4, 2).to(dev)
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        model.eval()
        model(torch.randn(3, 4, device=dev)).argmax(-1).cpu()
    torch.zeros(3, device=dev).normal_().nonzero().cpu()
    assert sent, "nothing was recorded: the shim no longer sends through Session.op"
    missing = sorted(sent - load_allowlist())
    assert not missing, f"ops the shim sends for the test models are not on server/allowed_ops.txt: {missing}"


def test_backwards_of_common_activations_pools_and_upsampling_run(dev: torch.device) -> None:
    """What pytorch/examples' dcgan (LeakyReLU), gat (LeakyReLU), MobileNet-style (ReLU6, Hardswish), LLaMA-style
    (SiLU) and VGG (AdaptiveAvgPool2d((7, 7))) send backward. Until round 32 scripts/gen_allowlist.py traced no
    OpInfo backward (its torch.autograd.backward call raised TypeError, swallowed), so only the few backwards of its
    own models were allowed: dcgan stopped at its first D step with 'aten::leaky_relu_backward ... denied'. One
    step of a model made of them trains on the daemon, with the CPU's gradients."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.ReplicationPad2d(1), nn.Conv2d(8, 8, 3), nn.SiLU(),
        nn.Hardswish(), nn.ReLU6(), nn.ELU(), nn.Mish(), nn.Softplus(), nn.Hardsigmoid(), nn.LogSigmoid(),
        nn.Upsample(scale_factor=2, mode="bilinear"), nn.AdaptiveAvgPool2d((3, 3)), nn.Flatten(), nn.Linear(72, 4),
    )  # fmt: skip
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    remote = model.to(dev)
    remote(x.to(dev)).sum().backward()
    for p, g in zip(remote.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad.cpu(), g, rtol=1e-5, atol=1e-6)
    allowed = load_allowlist()
    for name in ("leaky_relu", "silu", "hardswish", "hardtanh", "elu", "mish", "softplus", "hardsigmoid"):
        assert f"aten::{name}_backward.default" in allowed
