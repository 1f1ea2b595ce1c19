"""The C++ client spike (client/native/native_client.cpp): one training step of the tiny MLP on the spike device.

The spike must own PrivateUse1, which this pytest process has given to gpupool (its package registers at `import
torch`), so the checks run in a child process (this file as a script, TORCH_DEVICE_BACKEND_AUTOLOAD=0) that prints
JSON; the tests read it. Building the backend takes ~1 min the first time (cached after, per user).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

if __name__ != "__main__":
    import pytest
    from gpupool.client.native.backend import compiler_missing

    _why = compiler_missing()
    pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why is not None, reason=f"spike backend: {_why}")]

    @pytest.fixture(scope="module")
    def child() -> dict[str, Any]:
        env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
        proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def test_same_aten_ops_and_metas_as_local(child: dict[str, Any]) -> None:
        local, spike = child["local_ops"], child["spike_ops"]
        assert [name for name, _ in spike[:2]] == ["aten::_to_copy"] * 2  # x, y uploaded (local uses them as they are)
        spike = spike[2:]
        assert [name for name, _ in spike] == [name for name, _ in local]
        for (name, lm), (_, sm) in zip(local, spike, strict=True):
            assert sm == lm, name
        assert len(local) > 50

    def test_each_compute_op_makes_one_record_of_its_own_name(child: dict[str, Any]) -> None:
        recorded = 0
        for name, kinds, is_view, on_device in child["attributed"]:
            ops = [k for k in kinds if k.startswith("op:")]
            if not on_device or is_view:
                assert kinds == [], (name, kinds)  # views and CPU ops send nothing
                continue
            if name == "aten::_to_copy":  # an upload into a new handle
                assert kinds == ["alloc", "upload"]
            elif name == "aten::ones_like":  # CompositeExplicitAutograd: empty_like + fill_
                assert kinds == ["alloc", "op:aten::fill_.Scalar"]
            else:
                assert ops == [f"op:{name}"], (name, kinds)
            recorded += len(ops)
        assert recorded == child["records_per_step"] == 27  # 20 forward/backward + 7 foreach optimizer ops

    def test_records_without_the_mode_are_the_same(child: dict[str, Any]) -> None:
        under_mode = [k for _, kinds, _, _ in child["attributed"] for k in kinds]
        assert child["plain_kinds"] == under_mode

    def test_every_handle_freed_exactly_once(child: dict[str, Any]) -> None:
        f = child["frees"]
        assert f["double_frees"] == 0
        assert f["live_after_steps"] == 6 + 6 + 12  # params, grads, Adam's two moments (its step counts are CPU)
        assert f["live_at_end"] == 0
        assert f["allocated"] == f["freed"] > 100
        assert f["freed_handles_unique"] and f["freed_set_is_allocated_set"]

    def test_upload_bytes_and_zero_syncs(child: dict[str, Any]) -> None:
        assert child["upload_matches"]
        assert child["item"] == 0.0 and child["cpu_zeros"] and child["syncs"] == 2

    def test_meta_cache_hits_in_steady_state(child: dict[str, Any]) -> None:
        assert child["steady_meta_runs"] == 0

    def test_resizing_out_is_a_clear_error(child: dict[str, Any]) -> None:
        assert "resizes an out= argument" in child["resize_error"]

    def test_unsupported_argument_is_a_clear_error_and_leaves_no_partial_record(child: dict[str, Any]) -> None:
        assert "an argument of kind Generator is not supported" in child["generator_error"]
        assert child["after_error_kinds"] == ["alloc", "op:aten::add.Tensor"]  # randn's empty; the buffer still decodes


def _run_child() -> dict[str, Any]:
    """The checks, in a process that owns PrivateUse1."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    sys.path.insert(0, str(ROOT / "bench"))
    from gpupool.client.native import backend as n

    n.load()
    n.configure(keep=True, track=True)  # before any tensor: every handle is tracked
    n.claim()
    freed: list[int] = []  # every handle in every free record of the run

    def take() -> list[dict[str, Any]]:
        records = n.take_records()
        freed.extend(h for r in records if r["kind"] == "free" for h in r["handles"])
        return records

    from native_client_spike import setup

    torch.set_num_threads(1)
    spike_dev = n.device()

    def norm(func: Any) -> str:
        s = func._schema
        return f"{s.name}.{s.overload_name}" if s.overload_name else s.name

    def on_device(args: Any, kwargs: Any) -> bool:
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        return any((a.device if isinstance(a, torch.Tensor) else a).type == n.NAME
                   for a in flat if isinstance(a, torch.Tensor | torch.device))  # fmt: skip

    class Trace(TorchDispatchMode):
        def __init__(self, attribute: bool) -> None:
            super().__init__()
            self.attribute = attribute
            self.ops: list[Any] = []
            self.attributed: list[Any] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            flat = out if isinstance(out, list | tuple) else [out]
            metas = [[list(t.shape), list(t.stride()), str(t.dtype)] if isinstance(t, torch.Tensor) else None
                     for t in flat]  # fmt: skip
            self.ops.append([norm(func), metas])
            if self.attribute:
                kinds = _kinds(take())
                rets = func._schema.returns
                is_view = bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)
                self.attributed.append([norm(func), kinds, is_view, on_device(args, kwargs)])
            return out

    result: dict[str, Any] = {}
    local_step, _ = setup("local")
    spike_step, spike_opt = setup("spike")
    for i in range(3):
        local_step(i)
        spike_step(i)
    take()
    with Trace(False) as t_local:
        local_step(3)
    before = n.stats()
    with Trace(True) as t_spike:
        spike_step(3)
    result["steady_meta_runs"] = n.stats()["meta_runs"] - before["meta_runs"]
    result["local_ops"], result["spike_ops"] = t_local.ops, t_spike.ops
    result["attributed"] = t_spike.attributed
    take()
    stats0 = n.stats()
    loss = spike_step(3)
    plain = take()
    result["plain_kinds"] = _kinds(plain)
    result["records_per_step"] = n.stats()["op_records"] - stats0["op_records"]

    # Uploads carry the bytes of the CPU tensor, in the destination's dtype.
    x = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    xd = x.to(spike_dev, torch.float32)
    ups = [r for r in take() if r["kind"] == "upload"]
    result["upload_matches"] = (
        len(ups) == 1 and ups[0]["data"] == x.float().numpy().tobytes() and ups[0]["sizes"] == [3, 4]
    )
    # Syncs: a record each, and zeros (no daemon answers).
    s0 = n.stats()["syncs"]
    result["item"] = loss.item()
    result["cpu_zeros"] = bool((xd.cpu() == 0).all())
    result["syncs"] = n.stats()["syncs"] - s0
    try:
        torch.add(xd, xd, out=torch.empty(2, device=spike_dev))
        result["resize_error"] = ""
    except RuntimeError as e:
        result["resize_error"] = str(e)
    # An argument the spike cannot encode: a clear error, and the buffer stays whole (take() decodes it, strictly).
    take()
    try:
        torch.randn(3, device=spike_dev, generator=torch.Generator())
        result["generator_error"] = ""
    except RuntimeError as e:
        result["generator_error"] = str(e)
    _ = xd + xd
    result["after_error_kinds"] = _kinds(take())
    del x, xd, loss, ups, _

    # Handles: the ones alive after the steps are exactly the state's; all come back once everything dies.
    import gc

    gc.collect()
    live_after = n.stats()["live"]
    del spike_step, spike_opt, t_spike
    gc.collect()
    st = n.stats()
    take()
    result["frees"] = {
        "double_frees": st["double_frees"],
        "live_after_steps": live_after,
        "live_at_end": st["live"],
        "allocated": st["allocated"],
        "freed": st["freed"],
        "freed_handles_unique": len(freed) == len(set(freed)),
        "freed_set_is_allocated_set": set(freed) == set(range(1, st["allocated"] + 1)),  # handles count from 1
    }
    return result


def _kinds(records: list[dict[str, Any]]) -> list[str]:
    return [f"op:{r['op']}" if r["kind"] == "op" else r["kind"] for r in records if r["kind"] != "free"]


if __name__ == "__main__":
    print(json.dumps(_run_child()))
