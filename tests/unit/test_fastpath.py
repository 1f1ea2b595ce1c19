"""client/fastpath.py without a daemon: local CPU modules keep torch's fast path after `install`, and TorchScript
still compiles the wrapped modules. (The gpupool side, both clients against the CPU:
tests/integration/test_cuda_scripts.py `test_transformer_eval_loop_gives_the_cpu_values`.)"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from gpupool.client import fastpath


@pytest.fixture(autouse=True)
def installed() -> None:
    fastpath.install("gpupool")  # (idempotent: what both clients call when they load)


def test_a_local_cpu_module_keeps_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds without the change too (pins that the wrapper leaves CPU/CUDA modules alone)."""
    calls: list[str] = []
    for name in ("_native_multi_head_attention", "_transformer_encoder_layer_fwd"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mha(x, x, x, need_weights=False)
        layer(x)
    assert calls == ["_native_multi_head_attention", "_transformer_encoder_layer_fwd"]
    assert torch.backends.mha.get_fastpath_enabled()


def test_torchscript_compiles_the_wrapped_modules() -> None:
    """The wrapper runs with the original forward's globals: a naive wrapper failed here ("undefined value F")."""
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2).eval()
    scripted = torch.jit.script(encoder)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert torch.allclose(scripted(x), encoder(x), atol=1e-6)
    torch.jit.script(nn.MultiheadAttention(8, 2, batch_first=True))
