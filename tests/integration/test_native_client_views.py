"""View arguments of the C++ client (`gpupool run --native-client`, client/native/native_client.cpp `put_ref`): a
tensor argument that is a view of a storage the daemon holds (t(), a slice, expand, diagonal, a gradient that is a
slice of a flat buffer) travels as a compact view argument (VIEW; in a tensor list, VIEWS) and makes no record of its
own; the cases that need a daemon tensor of the view's own (an out= op, which may restride its output; a Tensor?[]
holding a None) take a view handle (`aten::as_strided`). Each case's result read back from the daemon equals local
CPU eager's bit for bit: matmul and add over transposed, sliced and expanded inputs, in-place ops and copies into
views, cat/stack of views, index with a None, Adam and AdamW (foreach) over gradient views, a view whose base tensor
was freed, and a small model trained with its weights used transposed and sliced.

Slow (a `gpupool up` pool; the C++ client's first build takes ~1 min, cached after). Skipped without a C++ compiler
or ninja.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from gpupool.client.native.backend import compiler_missing
from support import communicate, warmed_python
from test_native_client_run import _env, _run

_why = compiler_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why is not None, reason=f"native client: {_why}")]

# torch only, the device from argv; every case's result as JSON (and, on the device, the C++ client's counters).
SCRIPT = r"""
import gc, json, sys
import torch
from torch import nn

dev = sys.argv[1]
torch.manual_seed(0)
out = {}


def d(t):
    return t.to(dev)


def c(t):
    return t.detach().cpu().tolist()


a, b, w = d(torch.randn(5, 7)), d(torch.randn(6, 7)), d(torch.randn(7, 6))
out["matmul_t"] = c(a @ b.t())  # a transposed input
out["matmul_t_left"] = c(a.t() @ a)
out["matmul_slices"] = c(a[1:4, 2:6] @ w[3:7, 1:5])  # offsets in both
out["add_slice"] = c(a[:, 1:3] + b[2:4].t()[1:6])
out["add_expand"] = c(a[:, :1].expand(-1, 7) + b[1].unsqueeze(0).expand(5, -1))
out["select_diag"] = c(w.diagonal() * 2 + w[4])
buf = d(torch.zeros(6, 8))
buf[1:3].add_(1.5)  # in place on views: written through into the base
buf.t()[2].mul_(-3)
buf[:, 5].fill_(7)
buf[4:6, 1:4] = torch.arange(6.0).view(2, 3)  # a copy from the CPU into a view
buf[0, 2:6].copy_(a[2, 3:7])  # a copy between device views
buf[3:5].addcmul_(a[0:2, 0:8 - 1].sum(1, keepdim=True), buf[0:2], value=0.5)
out["inplace_views"] = c(buf)
out["cat_views"] = c(torch.cat([a[0:2], b.t()[:, 1:3].t(), w.t()[2:4, :7]]))  # a tensor list with views
out["stack_views"] = c(torch.stack([a[0], a[2], b[1]]))
out["clone_views"] = c(a[1:4, 0:5].t().contiguous() * 2 + b[2:5, 1:6].t().reshape(-1).view(5, 3))  # clone of views
idx = d(torch.tensor([0, 2, 3, 1, 4]))
out["index_none"] = c(w[:, idx[1:4]])  # a Tensor?[] with a None and a view: the handle path
out["index_select"] = c(a.t().index_select(1, idx[1:4]))  # both arguments views
base = d(torch.randn(6, 4))
v = base[2:5].t()
want = base.detach().cpu()[2:5].t() * 3 + 1
del base
gc.collect()
out["freed_base"] = c(v * 3 + 1)  # the view keeps its storage: its base's handle still names it
out["freed_base_local"] = c(want)
o = d(torch.zeros(4, 7))
torch.mul(a[1:3], 2.0, out=o[1:3])  # out= into a view: may restride, so a view handle (as_strided)
out["out_view"] = c(o)
put = d(torch.zeros(5, 3))
put[idx[1:3]] = d(torch.ones(2, 3))  # index_put_: the C++ client sends its composite's _index_put_impl_
put.index_put_((idx[0:2],), d(torch.full((2, 3), 2.0)), accumulate=True)
out["index_put"] = c(put)

# Adam / AdamW (foreach) over gradients that are views of one flat buffer
for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
    torch.manual_seed(1)
    p1, p2 = nn.Parameter(d(torch.randn(3, 4))), nn.Parameter(d(torch.randn(8)))
    opt = cls([p1, p2], lr=1e-2, foreach=True)
    for step in range(3):
        flat = d(torch.randn(40))
        p1.grad = flat[0:12].view(3, 4)  # offset 0, another geometry
        p2.grad = flat[20:36:2]  # offset 20, stride 2
        opt.step()
    out[name] = [c(p1), c(p2), c(opt.state[p1]["exp_avg_sq"]), c(opt.state[p2]["exp_avg"])]

# a small model whose weights are used transposed and sliced, trained with AdamW (foreach)
torch.manual_seed(2)
lin = nn.Linear(8, 8).to(dev)
optim = torch.optim.AdamW(lin.parameters(), lr=1e-2, foreach=True)
x = d(torch.randn(4, 8))
losses = []
for step in range(4):
    optim.zero_grad()
    h = lin(x)
    y = h[:, :4] @ lin.weight[2:6, 1:5].t() + h.t()[4:8].t()
    loss = (y * y).mean()
    loss.backward()
    optim.step()
    losses.append(loss.item())
out["train_losses"] = losses
out["train_weights"] = [c(p) for p in lin.parameters()]

# 300 parameters: Adam's `_foreach_` ops return more tensors than a compact record names (a u8 count of outputs)
torch.manual_seed(3)
deep = nn.Sequential(*(nn.Linear(4, 4) for _ in range(150))).to(dev)
optim = torch.optim.Adam(deep.parameters(), lr=1e-3, foreach=True)
x = d(torch.randn(8, 4))
for step in range(2):
    optim.zero_grad()
    deep(x).square().mean().backward()
    optim.step()
out["adam_300_params"] = [c(deep[0].weight), c(deep[-1].bias)]
if dev != "cpu":
    from gpupool.client.native import backend

    out["client"] = "python shim" if "gpupool.client.torch" in sys.modules else "native"
    out["wire"] = backend.wire_stats()
    out["stats"] = backend.stats()
print(json.dumps(out))
"""

CASES = (
    "matmul_t", "matmul_t_left", "matmul_slices", "add_slice", "add_expand", "select_diag", "inplace_views",
    "cat_views", "stack_views", "clone_views", "index_none", "index_select", "freed_base", "out_view", "adam", "adamw",
    "train_losses", "train_weights", "adam_300_params", "index_put",
)  # fmt: skip


@pytest.fixture(scope="module")
def runs(two_gpu_pool: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """(local CPU's results, the native client's) of SCRIPT, the latter through a `gpupool up` pool (conftest.py's
    shared pool of two 512 MiB fake GPUs; a lease of one)."""
    pool = two_gpu_pool
    script = tmp_path_factory.mktemp("views") / "views.py"
    script.write_text(SCRIPT)
    # the local reference side by side with the run on the pool (one after the other until round 25)
    local = subprocess.Popen(warmed_python(str(script), "cpu"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=_env(pool))  # fmt: skip
    ran = _run(pool, "-p", "0.5", "--native-client", "--", sys.executable, str(script), "gpupool")
    stdout, stderr = communicate(local, 120)
    assert local.returncode == 0, stderr[-3000:]
    assert ran.returncode == 0, ran.stderr[-3000:]
    return _last_json(stdout), _last_json(ran.stdout)


def _last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", CASES)
def test_each_view_case_gives_local_cpu_results_bit_for_bit(runs: tuple[dict[str, Any], ...], case: str) -> None:
    """Bit for bit, though the local run is a fresh process (support.assert_float32_close): no tensor of SCRIPT has
    more than 48 elements, so no op takes a parallel path (ATen's grain is 2048 and more) and one thread on one CPU
    runs the same kernels in both processes, from 64-byte aligned storages at the same offsets."""
    local, native = runs
    assert native["client"] == "native"
    assert native[case] == local[case]


def test_the_freed_base_case_reads_the_view_not_zeros(runs: tuple[dict[str, Any], ...]) -> None:
    local, native = runs
    assert native["freed_base"] == local["freed_base_local"] == local["freed_base"]
    assert len(set(local["train_losses"])) == 4  # it trains: every step's loss differs


def test_views_travel_as_view_arguments_and_handles_only_where_needed(runs: tuple[dict[str, Any], ...]) -> None:
    w = runs[1]["wire"]
    assert w["view_args"] > 50  # every view argument above, and the training's t() of the weights and the gradients
    # view handles (an as_strided record each) only for what needs a daemon tensor of its own: the out= into a view,
    # the index's Tensor?[] with a None and a view, and the syncs (`.cpu()`) of views; not one per view argument
    assert 0 < w["view_handles"] <= 6, w
