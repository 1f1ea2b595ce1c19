"""A checkpoint saved from device tensors on either client (storages tagged `gpupool:0`: the C++ client's as torch tags
any device's, the Python client's CPU copies by client/checkpoints.py `mark_saved`), loaded (client/checkpoints.py):
under `gpupool run` on either client without `map_location` and with `map_location="gpupool:0"`, onto the device,
with the saved values, a whole module included (its parameters Parameters, leaves an optimizer can take), and usable
(a linear layer of the loaded weight); in a process with no gpupool device (a CPU-only edge machine) one error naming
`map_location`, and with `map_location="cpu"` the values on the CPU. Until round 34 the first failed on the C++ client
with "module 'torch.gpupool' has no attribute 'device'", on the Python client with a TypeError, and the second with
torch's "don't know how to restore data location ... (tagged with gpupool:0)". Until round 35 the Python client saved
its tensors tagged `cpu`: the whole model came back on the CPU (word_language_model's reload failed), its parameters
plain tensors, and the CPU-only load needed no `map_location`.

Slow (the C++ client's first build takes ~1 min; cached after). Skipped only where no C++ compiler or ninja exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpupool.client.native.backend import compiler_missing
from scheduler_fixtures import ROOT

_why = compiler_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why is not None, reason=f"native client: {_why}")]

SAVE = """
import sys, torch
if sys.argv[2] == "shim":
    import gpupool.torch  # the Python client's device (the C++ client's comes with `import torch`)
torch.manual_seed(0)
model = torch.nn.Linear(3, 2).to("gpupool")
torch.save({"model": model.state_dict(), "t": torch.arange(4.0, device="gpupool")[1:]}, sys.argv[1] + "/state.pt")
torch.save(model, sys.argv[1] + "/model.pt")
torch.save(torch.nn.LSTM(3, 4).to("gpupool"), sys.argv[1] + "/lstm.pt")  # word_language_model saves its RNN whole
print(model.weight.device)
"""

LOAD = """
import json, sys, torch
import gpupool.torch  # the Python client's device (the C++ client is loaded at `import torch` already)
state = torch.load(sys.argv[1] + "/state.pt")
mapped = torch.load(sys.argv[1] + "/state.pt", map_location="gpupool:0")
model = torch.load(sys.argv[1] + "/model.pt", weights_only=False)
lstm = torch.load(sys.argv[1] + "/lstm.pt", weights_only=False)  # its forward reads _flat_weights: the moved ones
x = torch.ones(1, 3, device="gpupool")
print(json.dumps({
    "devices": sorted({str(t.device) for t in [*state["model"].values(), state["t"], mapped["t"], model.weight]}),
    "t": state["t"].tolist(), "mapped": mapped["t"].tolist(), "weight": state["model"]["weight"].tolist(),
    "linear": torch.nn.functional.linear(x, state["model"]["weight"], state["model"]["bias"]).tolist(),
    "module": model(x).tolist(), "lstm": lstm(x)[0].tolist(), "lstm_device": str(lstm.weight_hh_l0.device),
    "parameters": [isinstance(p, torch.nn.Parameter) and p.is_leaf and p.requires_grad
                   for m in (model, lstm) for p in m.parameters()],
}))
"""

PLAIN = """
import json, sys, torch
try:
    torch.load(sys.argv[1] + "/state.pt")
    error = None
except RuntimeError as exc:
    error = str(exc)
state = torch.load(sys.argv[1] + "/state.pt", map_location="cpu")
model = torch.nn.Linear(3, 2)
model.load_state_dict(state["model"])
lstm = torch.load(sys.argv[1] + "/lstm.pt", weights_only=False, map_location="cpu")
print(json.dumps({"error": error, "t": state["t"].tolist(), "weight": state["model"]["weight"].tolist(),
                  "linear": model(torch.ones(1, 3)).tolist(), "lstm": lstm(torch.ones(1, 3))[0].tolist()}))
"""


def _env(pool: str) -> dict[str, str]:
    """The pool's client environment (TLS, as the fixture set it), or with no pool none of gpupool's variables."""
    drop = (
        ("GPUPOOL_LEASE", "GPUPOOL_CUDA", "GPUPOOL_CLIENT") if pool else tuple(k for k in os.environ if "GPUPOOL" in k)
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONPATH": str(ROOT), **({"GPUPOOL_SCHEDULER": pool} if pool else {})}


def _python(code: str, where: Path, *run: str, pool: str = "", args: tuple[str, ...] = ()) -> dict | str:
    cmd = [sys.executable, "-c", code, str(where), *args]
    if run:
        cmd = [sys.executable, "-m", "gpupool.cli", "run", *run, "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=_env(pool), cwd=where)
    assert done.returncode == 0, f"{cmd}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    last = done.stdout.strip().splitlines()[-1]
    return json.loads(last) if last.startswith("{") else last  # type: ignore[no-any-return]


@pytest.mark.parametrize("saver", ["native", "shim"])
def test_a_checkpoint_saved_on_the_device_loads_onto_it_and_elsewhere_needs_map_location(
    two_gpu_pool: str, tmp_path: Path, saver: str
) -> None:
    assert _python(SAVE, tmp_path, "--client", saver, pool=two_gpu_pool, args=(saver,)) == "gpupool:0"
    plain = _python(PLAIN, tmp_path)
    assert isinstance(plain, dict)
    assert plain["error"] is not None and "gpupool:0" in plain["error"], plain["error"]
    assert "map_location=torch.device('cpu')" in plain["error"]
    assert plain["t"] == [1.0, 2.0, 3.0]
    torch.manual_seed(0)
    reference = torch.nn.Linear(3, 2)  # the same seed's weights: the fake GPU draws the CPU's random stream
    assert plain["weight"] == reference.weight.tolist()
    for client in ("native", "shim"):
        got = _python(LOAD, tmp_path, "--client", client, pool=two_gpu_pool)
        assert isinstance(got, dict)
        assert got["devices"] == ["gpupool:0"], client
        assert got["t"] == got["mapped"] == [1.0, 2.0, 3.0], client
        assert got["weight"] == plain["weight"], client
        assert got["linear"] == plain["linear"] and got["module"] == plain["linear"], client
        assert got["lstm_device"] == "gpupool:0", client
        assert got["parameters"] == [True] * 6, client  # the Linear's 2, the LSTM's 4
        # float32 rounding apart (the fake GPU runs the cell as _thnn_fused_lstm_cell, server/fallbacks.py)
        torch.testing.assert_close(torch.tensor(got["lstm"]), torch.tensor(plain["lstm"]), msg=client)
