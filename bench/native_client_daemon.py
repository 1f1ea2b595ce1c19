"""The C++ client (client/native/native_client.cpp: the round-12 spike, since round 14 gpupool.client.native, the device
of `gpupool run --native-client`) against a real daemon: launch_bound.py's models trained through a session, each
class of op the C++ encoder does not send, and daemon errors.

The spike's wire mode writes the daemon's compact eager records (docs/wire.md, "Compact eager ops"), uploads and
frees as `ClientFrame.commands` bytes in C++, and hands the buffer to client/session.py's Session once per frame (32
commands or 1 MiB, or a sync: `.item()` flushes and reads the value in the same round trip) with
`Session.send_commands`. Views travel as view arguments of the records that take them (compact VIEW / VIEWS: their
storage's handle and their geometry; `wire_stats()`' `view_args`); an `as_strided` view handle only where a daemon
tensor of the view's own is needed (a sync of a view, an op that may restride its written arguments). Every op goes
to the C++ encoder (`--op-set`: only the tiny MLP's and the encoder's); what it cannot send goes to
the Python fallback (client/native/backend.py `_python_op`: a protobuf `Op`, or the CPU around a sync).

    .venv/bin/python bench/native_client_daemon.py --steps 20            # losses: spike vs local CPU eager
    .venv/bin/python bench/native_client_daemon.py --model cnn --steps 4 # also encoder, mlp (cnn, encoder: eval mode)
    .venv/bin/python bench/native_client_daemon.py --breadth             # the Python fallback's op classes, errors
    nice -n 10 .venv/bin/python bench/native_client_daemon.py --time --rounds 5 --steps 50
    .venv/bin/python bench/native_client_daemon.py --callgrind --steps 10  # instructions of the whole client

The driver starts `gpupool serve --fake-gpus 1` on loopback with TLS (bench/train_overhead.py's bench_daemons) and
runs the worker in a child process (TORCH_DEVICE_BACKEND_AUTOLOAD=0: the spike must own PrivateUse1); `--callgrind`
runs that child under valgrind with the instrumentation on around the measured steps only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cgtools

ROOT = Path(__file__).resolve().parent.parent
# the Python shim's commands per step (launch_bound.py's "commands/step", eager): the spike's instructions per step
# are divided by these, as client_ab.py --measure instr divides the shim's
SHIM_OPS = {"tiny-mlp": 44, "encoder": 340, "mlp": 66, "cnn": 55}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    if os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD") != "0":
        raise SystemExit("the worker needs TORCH_DEVICE_BACKEND_AUTOLOAD=0 (the spike must own PrivateUse1)")
    import torch
    from gpupool.client.native import backend as nc
    from gpupool.client.session import Session

    torch.set_num_threads(1)
    nc.load()
    nc.claim()
    from gpupool.client.engine import run_backward_on_calling_thread

    run_backward_on_calling_thread()  # as gpupool.client.native.enable() (`gpupool run --native-client`) runs backward
    session = Session.attach(args.address, args.token, timeout=120.0)  # 120 s: under valgrind
    nc.connect(session, nc.TINY_MLP_OPS + nc.ENCODER_OPS if args.op_set else None)
    if args.breadth:
        return breadth(nc, session)
    dev = nc.device()
    sys.path.insert(0, str(ROOT / "bench"))
    from cgtools import instrumented
    from launch_bound import workload

    base, data, loss_fn = workload(args.model)
    if args.model in ("encoder", "cnn") and not args.dropout:
        base.eval()  # no dropout: the daemon's random numbers are not the CPU's (the weights still train)
    local = copy.deepcopy(base)
    remote = copy.deepcopy(base).to(dev)
    ways = {"local": (local, torch.device("cpu")), "spike": (remote, dev)}
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, (m, _) in ways.items()}

    def step(way: str, i: int) -> Any:
        model, d = ways[way]
        opt = opts[way]
        x, y = data[i % 4]
        opt.zero_grad()
        loss = loss_fn(model(x.to(d)), y.to(d))
        loss.backward()
        opt.step()
        return loss

    out: dict[str, Any] = {}
    if args.callgrind:
        # as client_ab.py --measure instr counts the Python shim: 4 warm-up steps, then 2 blocks of --steps steps,
        # each ended by one .item() (the frame goes out and the value comes back)
        for i in range(4):
            step(args.callgrind, i).item()
        ops0 = nc.stats()["op_records"]
        with instrumented():
            for _ in range(2):
                for i in range(args.steps):
                    loss = step(args.callgrind, i)
                loss.item()
        out["op_records"] = nc.stats()["op_records"] - ops0
        out["steps"] = 2 * args.steps
    elif args.time:
        times: dict[str, list[float]] = {"local": [], "spike": []}
        cpu: dict[str, list[float]] = {"local": [], "spike": []}
        split: dict[str, dict[str, list[float]]] = {w: {"user": [], "sys": [], "switches": []} for w in times}
        for i in range(3):
            for way in times:
                step(way, i).item()
        for _ in range(args.rounds):
            for way in times:
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t, c = time.perf_counter(), time.process_time()
                for i in range(args.steps):
                    loss = step(way, i)
                loss.item()  # one sync per block, as launch_bound.py's eager mode
                times[way].append((time.perf_counter() - t) / args.steps)
                cpu[way].append((time.process_time() - c) / args.steps)  # this process, all its threads (gRPC's)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                split[way]["user"].append((r1.ru_utime - r0.ru_utime) / args.steps)
                split[way]["sys"].append((r1.ru_stime - r0.ru_stime) / args.steps)
                switches = r1.ru_nvcsw + r1.ru_nivcsw - r0.ru_nvcsw - r0.ru_nivcsw
                split[way]["switches"].append(switches / args.steps * 1e-6)  # * 1e6 below: per step
        out["step_us"] = {w: {"best": min(v) * 1e6, "median": statistics.median(v) * 1e6} for w, v in times.items()}
        out["client_cpu_us"] = {w: {"best": min(v) * 1e6, "median": statistics.median(v) * 1e6} for w, v in cpu.items()}
        # the CPU time split: user (instructions, and what the load does to them) and system (the kernel: gRPC's
        # socket writes, thread wake-ups); context switches of all the process's threads per step
        out["client_cpu_split"] = {
            w: {k: round(statistics.median(v) * 1e6, 2) for k, v in parts.items()} for w, parts in split.items()
        }
    else:
        # the frames the session is handed (Session.send_commands: the C++ client's hand-off, by its direct call or by
        # the `send` operator with GPUPOOL_NATIVE_HAND_OFF=0): how many
        sent = [0]
        send_commands = session.send_commands

        def counted(commands: bytes) -> None:
            sent[0] += 1
            send_commands(commands)

        session.send_commands = counted
        out["local"] = [step("local", i).item() for i in range(args.steps)]
        out["spike"] = [step("spike", i).item() for i in range(args.steps)]
        diffs = {
            name: (p.detach().cpu() - q.detach()).abs().max().item()
            for (name, p), q in zip(remote.named_parameters(), local.parameters(), strict=True)
        }
        out["max_param_diff"] = max(diffs.values())
        out["worst_param"] = max(diffs, key=lambda k: diffs[k])
        out["param_diffs"] = diffs
        # an op outside --op-set (or any op, without it): the Python fallback's `Op` (or the C++ record)
        p_remote, p_local = next(remote.parameters()), next(local.parameters())
        out["outside_diff"] = (torch.sin(p_remote).cpu() - torch.sin(p_local)).abs().max().item()
        out["python"] = dict(nc.PYTHON_STATS)
        try:  # a failure on the daemon (a target out of range: only the kernel sees values) comes back at the sync
            model, d = ways["spike"]
            x, _ = data[0]
            loss_fn(model(x.to(d)), torch.full((x.shape[0],), 99).to(d)).item()
            out["daemon_error"] = ""
        except Exception as exc:  # noqa: BLE001 (reported, whatever its type)
            out["daemon_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        out["after_error"] = step("spike", 0).item()  # the session goes on
        # frames an `.item()` hands the session: the C++ client's frame of the ops before it and the Sync, as one
        frames = session.frames_put
        out["item_value"] = (p_remote * 2).sum().item()
        out["item_frames"] = session.frames_put - frames
        out["item_local"] = (p_remote.cpu() * 2).sum().item()  # (the spike trained a step more than local)
        out["sent_frames"] = sent[0]
    torch.ops.gpupool_native.flush()
    out["stats"] = nc.stats()
    out["wire"] = nc.wire_stats()
    session.close()
    return out


def breadth(nc: Any, session: Any) -> dict[str, Any]:
    """Each class of op the C++ encoder does not send, on the spike through the daemon and on the CPU: the results
    (max absolute difference, or equality for non-tensors) and which way the Python fallback took."""
    import torch

    dev = nc.device()
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 5, generator=g)
    b = torch.randn(4, 5, generator=g).abs() + 0.5
    v = torch.tensor([3, 1, 3, 0, 7, 1])
    sorted_ = torch.tensor([0.0, 1.0, 2.0, 5.0])

    def rounding(x: Any, y: Any) -> Any:  # a string argument (div.Tensor_mode)
        return torch.div(x, y, rounding_mode="floor")

    def rounding_(x: Any, y: Any) -> Any:  # a string argument, in place
        z = x.clone()
        z.div_(y, rounding_mode="trunc")
        return z

    def gelu_tanh(x: Any, y: Any) -> Any:  # a string keyword argument, and its backward's
        x = x.detach().requires_grad_(True)
        out = torch.nn.functional.gelu(x * y, approximate="tanh")
        out.sum().backward()
        return torch.stack([out, x.grad])

    def searchsorted(x: Any, y: Any) -> Any:  # a string keyword argument (side)
        return torch.searchsorted(sorted_.to(x.device), x.flatten().contiguous(), side="right")

    def nonzero(x: Any, y: Any) -> Any:  # data-dependent shape
        return torch.nonzero(x > 0)

    def masked_select(x: Any, y: Any) -> Any:  # data-dependent shape, then used on the device
        return x.masked_select(x > 0) * 2

    def unique(x: Any, y: Any) -> Any:  # data-dependent shapes, several outputs
        vals, counts = torch.unique(v.to(x.device), return_counts=True)
        return torch.stack([vals, counts])

    def equal(x: Any, y: Any) -> Any:  # a non-tensor return
        return [torch.equal(x, x.clone()), torch.equal(x, y)]

    def cpu_tensor_arg(x: Any, y: Any) -> Any:  # a CPU tensor of 20 elements among a device op's arguments
        return torch.where(x > 0, x, torch.arange(20.0).reshape(4, 5))

    def generator(x: Any, y: Any) -> Any:  # a Generator argument (the CPU's numbers, as the shim gives them)
        return torch.rand(3, 4, generator=torch.Generator().manual_seed(5), device=x.device) + x[:3, :4]

    def generator_(x: Any, y: Any) -> Any:  # a Generator, in place: the CPU's result written back into the tensor
        z = x.clone()
        w = z[1:3]  # a view of it, written through its view handle
        w.normal_(generator=torch.Generator().manual_seed(7))
        return z + 0.0

    def out_resized(x: Any, y: Any) -> Any:  # an out= argument the op resizes (the Meta kernel's plan cannot keep it)
        o = torch.empty(0, device=x.device)
        torch.add(x, y, out=o)
        return o * 1.0

    def python_number(x: Any, y: Any) -> Any:  # a 0-dim tensor and Python numbers (`loss * 0.5`): float32, as local
        return (x * y).mean() * 0.5 + 1.0

    cases = {f.__name__: f for f in (rounding, rounding_, gelu_tanh, searchsorted, nonzero, masked_select, unique,
                                       equal, cpu_tensor_arg, generator, generator_, out_resized,
                                       python_number)}  # fmt: skip
    out: dict[str, Any] = {}
    for name, f in cases.items():
        before = dict(nc.PYTHON_STATS)
        calls = nc.wire_stats()["python_ops"]
        local = f(a, b)
        try:
            remote = f(a.to(dev), b.to(dev))
            if isinstance(remote, torch.Tensor):
                remote = remote.cpu()
                diff = (remote.double() - local.double()).abs().max().item() if local.numel() else 0.0
                same = remote.shape == local.shape and remote.dtype == local.dtype
                out[name] = {"diff": diff, "same_shape": same}
            else:
                out[name] = {"value": remote, "local": local}
        except Exception as exc:  # noqa: BLE001 - reported
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        out[name]["python"] = {k: nc.PYTHON_STATS[k] - before[k] for k in before}
        out[name]["python_ops"] = nc.wire_stats()["python_ops"] - calls
    out["cost_us"] = costs(nc, a.to(dev), b.to(dev))
    out["errors"] = errors(nc, session, a.to(dev))
    return out


def costs(nc: Any, x: Any, y: Any, n: int = 200) -> dict[str, float]:
    """Client CPU per op (secondary, noisy) of each way: a C++ record, the Python fallback's `Op`, its CPU path."""
    import torch

    ways = {
        "cpp_record": lambda: torch.div(x, y),
        "python_op": lambda: torch.div(x, y, rounding_mode="floor"),
        "cpu_path": lambda: torch.nonzero(x > 0),
    }
    out: dict[str, float] = {}
    for name, f in ways.items():
        f()
        torch.ops.gpupool_native.flush()
        t = time.process_time()
        for _ in range(n):
            f()
        torch.ops.gpupool_native.flush()
        out[name] = (time.process_time() - t) / n * 1e6
    return out


def errors(nc: Any, session: Any, x: Any) -> dict[str, Any]:
    """Daemon errors through the spike: each surfaces at the next sync as the shim's exception (type, op, message),
    and the session goes on; a closed session's ops raise DeviceLost."""
    import torch

    dev = nc.device()
    xl = x.cpu()

    def caught(f: Any) -> dict[str, Any]:
        try:
            f()
        except Exception as exc:  # noqa: BLE001 - reported
            return {"type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
                    "op": getattr(exc, "op", None), "message": str(exc).splitlines()[0],
                    "torch_oom": isinstance(exc, torch.OutOfMemoryError)}  # fmt: skip
        return {}

    out: dict[str, Any] = {}
    bad = torch.tensor([9]).to(dev)

    def compact_op() -> None:  # an eager record the C++ encoder wrote: the error waits for the sync
        y = x.index_select(0, bad) * 2
        out["compact_fire_and_forget"] = True  # nothing raised before the sync
        y.sum().item()

    out["compact"] = caught(compact_op)
    out["compact_after"] = [(x * 2).sum().item(), (xl * 2).sum().item()]
    out["shapes"] = caught(lambda: x + torch.ones(3).to(dev))  # an invalid call: torch's own error, at once
    out["synchronize"] = caught(lambda: (x.index_select(0, bad), torch.gpupool.synchronize()))  # type: ignore[attr-defined]
    out["synchronize_after"] = caught(lambda: torch.gpupool.synchronize())  # type: ignore[attr-defined]

    def python_op() -> None:  # an `Op` the Python fallback sent (a string argument)
        y = torch.searchsorted(x[0].sort().values, x[1], side="left", sorter=torch.tensor([9, 0, 1, 2, 3]).to(dev))
        out["python_fire_and_forget"] = True
        y.cpu()

    out["python"] = caught(python_op)
    out["python_after"] = [torch.div(v, 2.0, rounding_mode="floor").sum().item() for v in (x, xl)]
    if session.quota_bytes:

        def quota() -> None:
            big = torch.empty(session.quota_bytes // 4 + 1024, device=dev)
            big.fill_(1.0)
            big.sum().item()

        out["quota"] = caught(quota)
        out["quota_after"] = [(x + 1).sum().item(), (xl + 1).sum().item()]
    torch.ops.gpupool_native.flush()
    session.sync()
    session.close()
    out["closed"] = caught(lambda: (x + 1).sum().item())
    # a frame handed over (not a sync's) to a closed session: send_commands' error, raised through the direct
    # hand-off's `hand_off_failed` operator (the `send` operator's with GPUPOOL_NATIVE_HAND_OFF=0)
    out["closed_send"] = caught(lambda: (x + 1, torch.ops.gpupool_native.flush()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", choices=("tiny-mlp", "encoder", "mlp", "cnn"), default="tiny-mlp",
                   help="launch_bound.py's workload (the encoder and the CNN in eval mode: no dropout)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=5, help="--time: blocks of --steps steps per way")
    p.add_argument("--dropout", action="store_true", help="the encoder in train mode (its losses then differ: the "
                   "daemon's random numbers), as client_ab.py runs the shim: for --callgrind and --time")  # fmt: skip
    p.add_argument("--time", action="store_true", help="step times, local and spike interleaved in one process (and "
                   "the client's CPU per step: user, system, context switches)")  # fmt: skip
    p.add_argument("--callgrind", nargs="?", const="spike", choices=("spike", "local"), default=None,
                   help="under callgrind: instrumentation on around 2 x --steps steps of one way")  # fmt: skip
    p.add_argument("--callgrind-out", default="", help="keep callgrind's file here (for callgrind_annotate)")
    p.add_argument("--shim-ops", type=float, default=0.0, help="--callgrind: the shim's commands per step to divide "
                   "by (default: SHIM_OPS)")  # fmt: skip
    p.add_argument("--op-set", action="store_true", help="the C++ encoder sends only the tiny MLP's and the encoder's "
                   "ops (client/native/backend.py); every other op goes to the Python fallback")  # fmt: skip
    p.add_argument("--breadth", action="store_true", help="each class of op the C++ encoder does not send (worker)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--token", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    from train_overhead import bench_daemons

    with bench_daemons(1) as daemons, tempfile.TemporaryDirectory() as tmp:
        remote = daemons.remote()
        cmd = [sys.executable, __file__, "--worker", "--address", remote["address"], "--token", remote["token"],
               "--steps", str(args.steps), "--rounds", str(args.rounds), "--model", args.model]  # fmt: skip
        flags = (("--dropout", args.dropout), ("--op-set", args.op_set), ("--breadth", args.breadth))
        cmd += [f for f, on in flags if on]
        if args.time:  # the client on core 0, the daemon on core 1, as launch_bound.py runs them
            cmd = ["taskset", "-c", "0", *cmd, "--time"]
        if args.callgrind:
            out_file = Path(args.callgrind_out or Path(tmp) / "cg.out")
            cmd = [*cgtools.valgrind(out_file), *cmd, "--callgrind", args.callgrind]
        env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if args.callgrind:
            totals = [ln for ln in out_file.read_text().splitlines() if ln.startswith(("totals:", "summary:"))]
            instr = int(totals[-1].split()[1])
            result["instructions"] = instr
            result["per_step"] = instr / result["steps"]
            shim_ops = args.shim_ops or SHIM_OPS.get(args.model, 0)  # the Python shim's commands per step
            if shim_ops:
                result["per_shim_op"] = instr / result["steps"] / shim_ops
            result["per_record"] = instr / max(1, result["op_records"])
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
