"""What the daemon runs per client op, against what local torch runs for the same training step (counts, no timing).

For each launch-bound workload of bench/launch_bound.py (its models, batches and Adam), one eager run through a
daemon on a fake GPU whose session worker counts its aten calls and its host reads of tensor values
(`GPUPOOL_OP_AUDIT`, server/opaudit.py), and one local CPU run counted the same way (a `TorchDispatchMode` below
autograd). Per training step: the ops the client sent, local's aten calls and kernels (calls that are not views,
allocations or metadata: what launches a kernel on a CUDA device), the worker's, the difference, and the worker's
host reads (`.item()` = `aten._local_scalar_dense`, `.tolist()`, `.cpu()`, `.numpy()`, copies between devices:
each a copy from the device and a wait for it on a CUDA GPU, free on a fake one). Then, per model, where they come
from: the ops whose count per step differs from local's, and the daemon source lines of the host reads.

Local CPU is not local CUDA: the same model calls a few other kernels there (the CPU's flash attention and
fused softmax kernels against CUDA's), and the daemon on a CUDA GPU runs other paths in a few places (the fused
attention's kernels, `_seeded`): the table is what a fake GPU's worker runs. The counts repeat exactly run to run.

    nice python bench/op_audit.py                                     # every model, ~1 min
    nice python bench/op_audit.py --models classifier --steps 4 --sites 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from gpupool.server import opaudit
from launch_bound import MODELS, adam, training_step, workload
from train_overhead import add_worker_flags, bench_daemons, run_worker

ROOT = Path(__file__).resolve().parent.parent


def _per_op(calls: dict[str, int]) -> Counter[str]:
    out: Counter[str] = Counter()
    for key, n in calls.items():
        out[key.partition("|")[0]] += n
    return out


def _kernels(per_op: Counter[str]) -> int:
    return sum(n for name, n in per_op.items() if name not in opaudit.NO_KERNEL and not _is_view(name))


def _is_view(name: str) -> bool:
    packet = getattr(torch.ops.aten, name.removeprefix("aten."), None)
    if packet is None:
        return False
    return any(getattr(packet, o).is_view for o in packet.overloads())


def _last(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text().strip().splitlines()[-1]))


def _diff(after: dict[str, int], before: dict[str, int], steps: int) -> dict[str, float]:
    return {k: (n - before.get(k, 0)) / steps for k, n in after.items() if n != before.get(k, 0)}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    model, data, loss_fn = workload(args.model)
    rt = None
    if args.mode == "local":
        device = torch.device("cpu")
    else:
        from gpupool.client.torch import runtime

        import gpupool.torch as gt

        device = gt.attach(args.address, args.token)
        rt = runtime.get(device.index)
    model = model.to(device)
    torch.manual_seed(1234)
    # local: foreach Adam, as local CUDA (and a gpupool device) defaults to; local CPU's default is the per-tensor loop
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True) if rt is None else adam(model, device, False)
    step = training_step(model, opt, loss_fn)
    for i in range(args.warmup):
        float(step(data[i % 4][0].to(device), data[i % 4][1].to(device)).item())
    if rt is None:  # local: the same steps under the counting mode
        counts = opaudit.Counts(sites=False)
        with counts:
            for i in range(args.steps):
                loss = step(data[i % 4][0].to(device), data[i % 4][1].to(device))
            loss.item()
        return {"calls": {k: n / args.steps for k, n in counts.calls.items()}, "reads": {}, "sent": 0.0}
    files = sorted(Path(args.audit_dir).glob("worker-*.jsonl"), key=lambda p: p.stat().st_mtime)
    path = files[-1]  # this session's worker: the one that answered the warm-up's last Sync
    before, sent0 = _last(path), rt.ops_sent
    for i in range(args.steps):
        loss = step(data[i % 4][0].to(device), data[i % 4][1].to(device))
    loss.item()
    after = _last(path)
    return {
        "calls": _diff(after["calls"], before["calls"], args.steps),
        "reads": _diff(after["reads"], before["reads"], args.steps),
        "sent": (rt.ops_sent - sent0) / args.steps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mlp,encoder,encoder-nodrop,classifier,mlp,cnn",
                   help="comma-separated: " + ",".join(MODELS))  # fmt: skip
    p.add_argument("--steps", type=int, default=4, help="counted steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sites", type=int, default=12, help="lines of differing ops and read sites per model")
    p.add_argument("--json", default="", help="also write the counts here")
    add_worker_flags(p)
    for a in ("--model", "--mode", "--audit-dir"):
        p.add_argument(a, default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as audit_dir:
        os.environ[opaudit.ENV] = audit_dir  # the daemon's workers inherit it
        try:
            with bench_daemons(args.daemon_core) as daemons:
                for model in args.models.split(","):
                    local = run_worker(__file__, args.daemon_core, f"{model}/local",
                                       ["--model", model, "--mode", "local", *flags])  # fmt: skip
                    eager = run_worker(__file__, args.client_core, f"{model}/eager",
                                       ["--model", model, "--mode", "eager", "--audit-dir", audit_dir, *flags],
                                       **daemons.remote())  # fmt: skip
                    results[model] = {"local": local, "eager": eager}
        finally:
            del os.environ[opaudit.ENV]
    print_table(results, args.sites)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.2f}"


def print_table(results: dict[str, Any], sites: int) -> None:
    print("| model | client ops/step | local aten calls (kernels)/step | worker aten calls (kernels)/step | "
          "extra kernels/step | daemon's host reads/step |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    details = []
    for model, r in results.items():
        local, worker_ops = _per_op(r["local"]["calls"]), _per_op(r["eager"]["calls"])
        lk, wk = _kernels(local), _kernels(worker_ops)
        reads = sum(n for k, n in r["eager"]["reads"].items() if ":_sync:" not in k)  # not the client's .item()
        print(f"| {model} | {_fmt(r['eager']['sent'])} | {_fmt(sum(local.values()))} ({_fmt(lk)}) | "
              f"{_fmt(sum(worker_ops.values()))} ({_fmt(wk)}) | {_fmt(wk - lk)} | {_fmt(reads)} |")  # fmt: skip
        diff = {op: worker_ops.get(op, 0) - local.get(op, 0) for op in set(local) | set(worker_ops)}
        diff = {op: d for op, d in diff.items() if abs(d) > 1e-9}
        lines = [f"{model}: ops per step, worker - local:"]
        for op, d in sorted(diff.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:sites]:
            where = sorted(((n, k.partition("|")[2]) for k, n in r["eager"]["calls"].items()
                            if k.partition("|")[0] == op), reverse=True)[:2]  # fmt: skip
            tag = "" if _kernels(Counter({op: 1})) else " (no kernel)"
            lines.append(f"  {d:+.2f} {op}{tag}  [worker: " + "; ".join(f"{_fmt(n)} at {s}" for n, s in where) + "]")
        lines.append(f"{model}: host reads per step:")
        for key, n in sorted(r["eager"]["reads"].items(), key=lambda kv: -kv[1])[:sites]:
            kind, _, where = key.partition("|")
            lines.append(f"  {_fmt(n)} {kind} at {where}")
        details.append("\n".join(lines))
    print()
    print("\n\n".join(details))


if __name__ == "__main__":
    sys.exit(main())
