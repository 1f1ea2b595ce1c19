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
