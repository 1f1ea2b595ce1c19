"""The worker's cost per replayed op of a captured step, over the bare kernels: `RunGraph` in-process on a fake GPU.

A launch_bound workload (tiny MLP, tiny encoder, ...) is captured through a real daemon (`gpupool.torch.capture`, Adam
with capturable=True, or fused=True with `--adam fused`); its DefineGraph, its persistent tensors and one RunGraph's
by-value inputs are saved, and a second process replays that graph with `CommandExecutor.execute` (what a session's
worker runs per step) against the same kernels called bare with the arguments the replay gave them, interleaved. The
difference per op is what the replay adds: input and persistent-tensor checks, slot filling, dead-slot drops, binding
outputs and kept tensors, memory accounting. CPU time of the thread (`time.thread_time`); the min of --repeats runs
counts (a loaded box inflates single runs; the min moves least). `--measure instr` counts instructions instead, and
also those of launch_bound's local step with the same `--adam` (the baseline the TorchScript call competes with).

    python bench/graph_replay.py                                    # tiny-mlp and encoder, ~2 min
    python bench/graph_replay.py --models classifier --steps 20
    python bench/graph_replay.py --measure instr                    # exact, under callgrind, ~2 min a model
    python bench/graph_replay.py --measure instr --adam fused --models tiny-mlp
    python bench/graph_replay.py --measure instr --against ../base --against-python ../base/.venv/bin/python
    python bench/graph_replay.py --measure outside --models tiny-mlp,mlp   # the worker's own, no kernels
    python bench/graph_replay.py --measure outside-slice --models tiny-mlp   # the same from the frame's bytes
    python bench/graph_replay.py --measure outside-slice --against ../base --against-python ../base/.venv/bin/python
    python bench/graph_replay.py --measure outside-cpu --models tiny-mlp,mlp --steps 300   # the same, CPU time
    python bench/graph_replay.py --measure outside-slice-cpu --models tiny-mlp,mlp   # outside-slice's, CPU time

A step whose CPU arguments are over capture.BY_VALUE_BYTES (the stock MLP's batch) uploads them before its RunGraph:
the replay binds a fresh tensor of the input's metadata per command for them, as the Upload did.
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cgtools
import torch

HERE = Path(__file__).resolve().parent


def dump(model_name: str, out: str, adam_kind: str = "capturable") -> None:
    """Capture the workload's step through a daemon; save the graph, its persistent tensors and one run's inputs."""
    from gpupool.client.torch import runtime
    from gpupool.client.torch.tensor import RemoteTensor
    from launch_bound import adam, training_step, workload
    from train_overhead import bench_daemons

    import gpupool.torch as gt
    from gpupool._proto import device_pb2

    torch.set_num_threads(1)
    saved: dict[str, Any] = {}
    with bench_daemons(1) as daemons:
        remote = daemons.remote()
        device = gt.attach(remote["address"], remote["token"])
        rt = runtime.get(device.index)
        model, data, loss_fn = workload(model_name)
        model = model.to(device)
        step = training_step(model, adam(model, device, True, adam_kind), loss_fn)

        define, run = rt.define_graph, rt.run_graph

        def define_graph(msg: Any) -> None:
            saved["define"] = msg.SerializeToString()
            define(msg)

        def run_graph(graph_id: int, inputs: Any, outputs: Any, drops: Any, data: Any = (), flush: bool = True) -> None:
            saved.setdefault("run", (list(inputs), [bytes(x) for x in data], len(outputs)))
            run(graph_id, inputs, outputs, drops, data, flush)

        rt.define_graph, rt.run_graph = define_graph, run_graph  # type: ignore[method-assign]
        captured = gt.capture(step)
        for i in range(6):
            captured(*data[i % 4]).item()
        want = set(device_pb2.DefineGraph.FromString(saved["define"]).persistent)
        tensors = {}
        for o in gc.get_objects():
            if isinstance(o, RemoteTensor) and o._gp_h in want and o._gp_h not in tensors:
                tensors[o._gp_h] = o.detach().cpu().clone()
        torch.save({"define": saved["define"], "run": saved["run"], "tensors": tensors}, out)


def _worker(path: str) -> tuple[Any, Any, Any]:
    """A session's worker in-process with the saved graph defined and its persistent tensors bound: the executor,
    the session, and a function making the next RunGraph command (fresh output handles each time)."""
    from gpupool.server import slices
    from gpupool.server.devices import FakeDevice
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    from gpupool._proto import device_pb2

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    d = torch.load(path)
    msg = device_pb2.DefineGraph.FromString(d["define"])
    number = next(iter(d["tensors"])) >> 32
    dev = FakeDevice(0, "bench", 1 << 34)
    s = WorkerSession("bench", number, dev, DeviceMemory(dev), 1 << 33)
    ex = CommandExecutor(slices.SliceLedger())
    ex.exclusive_rng = True  # as in a session's worker process
    ex.warm_up()
    for h, t in d["tensors"].items():
        s.bind(h, t.clone())
    ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
    if s.error is not None:
        raise SystemExit(f"definition failed: {s.error}")
    inputs, data, n_out = d["run"]
    handles = iter(range((number << 32) + (1 << 28), (number << 32) + (1 << 31)))
    # inputs the client uploaded before the run (CPU arguments over capture.BY_VALUE_BYTES: the stock MLP's batch)
    # are gone with the step: a fresh tensor of the graph's metadata is bound for each command, as the Upload did
    g = ex.graphs._of(s)[msg.graph_id]
    uploaded = {i: g.input_meta[i] for i, h in enumerate(inputs) if h and h not in s.tensors}

    def command() -> Any:
        run_inputs = list(inputs)
        for i, (shape, stride, _, dtype) in uploaded.items():
            run_inputs[i] = next(handles)
            t = torch.empty_strided(shape, stride, dtype=dtype)
            s.bind(run_inputs[i], t.normal_() if dtype.is_floating_point else t.zero_())
        outputs = [next(handles) for _ in range(n_out)]
        run = device_pb2.RunGraph(graph_id=msg.graph_id, inputs=run_inputs, outputs=outputs)
        run.input_data.extend(data)
        return device_pb2.Command(run_graph=run)

    return ex, s, command


def replay(path: str, steps: int, repeats: int) -> str:
    from gpupool.server import graph

    ex, s, command = _worker(path)
    calls: list[tuple[Any, Any, Any]] = []  # (kernel, args, kwargs) of one replay, for the bare column
    original = graph.execute

    def spy(g: Any, slots: list[Any]) -> None:
        saved = list(g.plan) if hasattr(g, "plan") else None
        if saved is not None:
            for j, st in enumerate(g.plan):
                g.plan[j] = (st[0], _recording(st[1], calls), *st[2:])
        else:  # a checkout whose Graph has no plan: its calls
            saved_fns = [c.fn for c in g.calls]
            for c in g.calls:
                c.fn = _recording(c.fn, calls)
        try:
            original(g, slots)
        finally:
            if saved is not None:
                g.plan[:] = saved
            else:
                for c, fn in zip(g.calls, saved_fns, strict=True):
                    c.fn = fn

    graph.execute = spy
    first = command()
    ex.execute(s, first, _no_reply)
    graph.execute = original
    n_ops = len(calls)
    res: dict[str, list[float]] = {"bare": [], "graph": []}
    for _ in range(repeats):
        cmds = [command() for _ in range(steps)]
        start = time.thread_time()
        for _ in range(steps):
            for fn, a, k in calls:
                fn(*a, **k)
        res["bare"].append((time.thread_time() - start) / steps)
        start = time.thread_time()
        for c in cmds:
            ex.execute(s, c, _no_reply)
        res["graph"].append((time.thread_time() - start) / steps)
        if s.error is not None:
            raise SystemExit(f"replay failed: {s.error}")
        for c in cmds:
            s.free(_fresh(s, c))
    bare, run = min(res["bare"]), min(res["graph"])
    med = statistics.median(res["graph"]) / statistics.median(res["bare"])
    return (f"{n_ops:5d} ops  bare {bare * 1e3:7.3f} ms/step  replay {run * 1e3:7.3f} ms/step  "
            f"{(run - bare) / n_ops * 1e6:+6.2f} us/op  ratio {run / bare:.3f} (medians: {med:.3f})")  # fmt: skip


def replay_instr(path: str, steps: int) -> str:
    """Inside valgrind: the worker's instructions per RunGraph (`CommandExecutor.execute`, the TorchScript call
    from the 3rd run on) over `steps` runs after 5 warm-up runs, and those inside the TorchScript call."""
    ex, s, command = _worker(path)
    for _ in range(5):
        c = command()
        ex.execute(s, c, _no_reply)
        s.free(_fresh(s, c))
    cmds = [command() for _ in range(steps)]
    with cgtools.instrumented():
        for c in cmds:
            ex.execute(s, c, _no_reply)
    if s.error is not None:
        raise SystemExit(f"replay failed: {s.error}")
    return "done"


def _kernels_out(path: str) -> tuple[Any, Any, Any]:
    """A worker whose graph ran (and was traced), its traced function replaced by one returning what a real run
    returns without running the kernels: what a RunGraph then costs is the worker's own work, not the kernels'. Each
    run gets tensors of its own, as a real run's (round 51): the outputs a real run made anew (the step's gradients,
    its loss) are new objects over new storages of the same bytes and layout, made when the command is (outside the
    count) and handed to the run that command starts; those it updated in place (an input or a tensor bound in the
    session: its parameters, its optimizer state) are the same objects. Until round 50 every run returned one real
    run's outputs, the very same objects, so each kept tensor was found bound already (native_runner.cpp
    `same_binding`) and its rebinding, a real step's, was never counted. Returns (executor, session, command maker)."""
    ex, s, make = _worker(path)

    def run() -> None:
        c = make()
        ex.execute(s, c, _no_reply)
        s.free(_fresh(s, c))

    for _ in range(5):
        run()
    traced = next(iter(ex.graphs._of(s).values())).traced
    if traced is None:
        raise SystemExit("the graph did not trace: no TorchScript call to take out")
    real, last = traced.fn, []

    def recording(*args: Any) -> Any:  # a real run: what it returned, and which of it was there before
        there = {id(a) for a in args} | {id(t) for t in s.tensors.values()}
        out = real(*args)
        given = {id(a): j for j, a in enumerate(args)}
        last[:] = [out, there, [(k, given[id(t)]) for k, t in enumerate(out) if id(t) in given]]
        return out

    traced.fn = recording
    run()
    out, there, taken = last
    # (round 52) a kept tensor the function wrote into a buffer it was given (graph_trace.Buffer) is that argument,
    # as a real run returns it: taken from the call's arguments, never held here (a run writes into the last run's
    # kept tensor only where nothing else holds it)
    out = type(out)(None if any(k == i for i, _ in taken) else t for k, t in enumerate(out))
    last.clear()
    queue: collections.deque[Any] = collections.deque()

    def command() -> Any:
        queue.append(_anew(out, there))
        return make()

    def replayed(*args: Any) -> Any:
        made = queue.popleft()
        for k, j in taken:
            made[k] = args[j]
        return made

    traced.fn = replayed
    return ex, s, command


def _anew(out: Any, there: set[int]) -> Any:
    """`out` (a real run's outputs) with each tensor not in `there` made anew: a copy of its storage's bytes (one per
    storage the outputs share) and a tensor over it at the same offset, sizes and strides. Made with tensors only, as
    a kernel makes its output: a storage made from Python (`UntypedStorage.clone`) has a Python object, whose
    deallocation (~1.3k instructions, the GIL taken) the tensor's rebinding would count and a real step's does not."""
    copies: dict[int, torch.Tensor] = {}
    res = []
    for t in out:
        if not isinstance(t, torch.Tensor) or id(t) in there:
            res.append(t)
            continue
        storage = t.untyped_storage()
        base = copies.get(storage._cdata)
        if base is None:
            base = copies[storage._cdata] = torch.empty(storage.nbytes(), dtype=torch.uint8)
            base.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        res.append(torch.empty(0, dtype=t.dtype).set_(base.view(t.dtype), t.storage_offset(), t.size(), t.stride()))
    return type(out)(res)


def outside_instr(path: str, steps: int) -> str:
    """Inside valgrind: the worker's own instructions per RunGraph, without the kernels: the traced function replaced
    by one returning what a real run returns (`_kernels_out`: new tensors where a real run makes them), so that what is
    counted is the run's inputs, persistent tensors, binding and accounting (`steps` 0: the harness alone, subtracted
    by `_outside`)."""
    ex, s, command = _kernels_out(path)
    cmds = [command() for _ in range(steps + 1)]
    ex.execute(s, cmds[0], _no_reply)
    with cgtools.instrumented():
        for c in cmds[1:]:
            ex.execute(s, c, _no_reply)
    if s.error is not None:
        raise SystemExit(f"replay failed: {s.error}")
    return "done"


def _slice_of(ex: Any, s: Any) -> Any:
    """What the session's worker does with a slice of one command's frame (server/worker.py: `run_owned_into`,
    `slices.run_slice_into`; before round 47 `run_commands`, then `slices.write_result` into the shared buffer): a
    function of the frame's bytes, as the request's payload is a view of the shared memory."""
    from gpupool.server import slices

    shared = memoryview(bytearray(1 << 20))
    result = memoryview(bytearray(1 << 20))
    mark = slices.word_mark(bytearray(64))
    timed = s.device.slice_timer()
    into = getattr(slices, "run_slice_into", None)  # the worker's (round 47), else `run_commands` + `write_result`

    def run(frame: bytes) -> None:
        shared[: len(frame)] = frame
        req = slices.SliceRequest(1 << 32, 1 << 20, 1.0, shared[: len(frame)])
        with s.lock:
            if into is not None:  # (round 47) the worker's entry: its result written straight into the buffer
                if into(s, ex.execute, ex.ledger, req, timed, mark, result).__class__ is not int:
                    raise SystemExit("the result did not fit the shared buffer")
                return
            r = slices.run_commands(s, ex.execute, ex.ledger, req, timed, mark)
        if slices.write_result(r, result) < 0:
            raise SystemExit("the result did not fit the shared buffer")

    return run


def outside_slice_instr(path: str, steps: int) -> str:
    """`outside_instr` with each RunGraph run as a slice of one command from its frame's bytes (`_slice_of`): what
    the worker adds to `CommandExecutor.execute` (the frame's parse, the slice's loop, its result) counted too."""
    from gpupool._proto import device_pb2

    ex, s, command = _kernels_out(path)
    run = _slice_of(ex, s)
    frames = [device_pb2.ClientFrame(commands=[command()]).SerializeToString() for _ in range(steps + 20)]
    for f in frames[:20]:  # the slice's functions run often enough for the interpreter's specialization
        run(f)
    with cgtools.instrumented():
        for f in frames[20:]:
            run(f)
    if s.error is not None:
        raise SystemExit(f"replay failed: {s.error}")
    return "done"


def outside_cpu(path: str, steps: int, repeats: int, sliced: bool = False) -> str:
    """`outside_instr`'s setup timed instead of counted: the thread's CPU a RunGraph over `steps` runs, `repeats`
    times (min and median), where callgrind is too slow on a loaded box (the stock MLP's count); `sliced`: each a
    slice of its frame's bytes (`outside_slice_instr`)."""
    from gpupool._proto import device_pb2

    ex, s, command = _kernels_out(path)
    run = _slice_of(ex, s)
    for _ in range(20 if sliced else 0):  # (as `outside_slice_instr` warms up)
        c = command()
        run(device_pb2.ClientFrame(commands=[c]).SerializeToString())
        s.free(_fresh(s, c))
    runs = []
    for _ in range(repeats):
        cmds = [command() for _ in range(steps)]
        frames = [device_pb2.ClientFrame(commands=[c]).SerializeToString() for c in cmds] if sliced else []
        start = time.thread_time()
        if sliced:
            for f in frames:
                run(f)
        else:
            for c in cmds:
                ex.execute(s, c, _no_reply)
        runs.append((time.thread_time() - start) / steps)
        for c in cmds:
            s.free(_fresh(s, c))
    if s.error is not None:
        raise SystemExit(f"replay failed: {s.error}")
    return f"worker per RunGraph outside the kernels: thread CPU min {min(runs) * 1e6:.1f} us, median " \
           f"{statistics.median(runs) * 1e6:.1f} us"  # fmt: skip


# The worker's parts of a captured step's slice shown apart (callgrind's inclusive counts): the C++ runner's whole
# quiet run (`graph_run`: checks, the traced call, the binding) and in it the binding of its outputs and kept tensors
RUN_PARTS = {"graph_run": "graph_run(", "rebind_run": "rebind_run("}


def _outside(model: str, path: str, steps: int, tmp: str, flag: str = "--outside-instr",
             against: tuple[str, str] | None = None) -> str:  # fmt: skip
    """`flag`'s count of `path` minus the harness's, and of it `RUN_PARTS`; `against` (python, checkout): that
    checkout's worker (its python imports its gpupool) counted by this bench on the same dumped graph at the same time
    (round 51: until then that checkout's own bench, whose kept tensors were the same objects every run)."""
    sys.path.insert(0, str(HERE))
    from daemon_ab import _inclusive, _total

    sides = [("", sys.executable)]
    if against is not None:
        sides.append(("base ", against[0]))
        where = subprocess.run([against[0], "-c", "import gpupool; print(gpupool.__file__)"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        if not Path(where).resolve().is_relative_to(Path(against[1]).resolve()):
            raise SystemExit(f"{against[0]} imports the gpupool of {where}, not {against[1]}'s")
    procs = []
    for tag, python in sides:
        for n in (steps, 0):
            out = Path(tmp) / f"cg.outside.{model}.{n}.{len(procs)}"
            cmd = [*cgtools.valgrind(out), python, __file__, flag, path, "--steps", str(n)]
            procs.append((tag, n, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    counts: dict[str, list[list[int]]] = {}
    for tag, _, out, proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{tag or 'this '}checkout's count failed: {err.decode(errors='replace')[-2000:]}")
        counts.setdefault(tag, []).append([_total(out), *_inclusive(out, *RUN_PARTS.values())])
    per = {tag: [(a - b) / steps for a, b in zip(*c, strict=True)] for tag, c in counts.items()}
    line = ""
    for tag, (total, *parts) in per.items():
        line += f"  {tag}" if tag else "worker per RunGraph outside the kernels"
        line += f" {total / 1e3:8.1f}k instructions ("
        line += ", ".join(f"{name} {n / 1e3:.1f}k" for name, n in zip(RUN_PARTS, parts, strict=True)) + ")"
    if against is not None:
        line += f"  ratio {per[''][0] / per['base '][0]:.3f}"
    return line


def local_instr(model_name: str, adam_kind: str, steps: int) -> str:
    """Inside valgrind: launch_bound's local step (CPU, one torch thread, its Adam: `--adam capturable` is torch's
    default Adam locally, `fused` Adam(fused=True)) over `steps` steps after 10 warm-up steps, all of it counted
    (autograd and the optimizer's Python included: what a local step costs)."""
    from launch_bound import adam, training_step, workload

    torch.set_num_threads(1)
    model, data, loss_fn = workload(model_name)
    step = training_step(model, adam(model, torch.device("cpu"), False, adam_kind), loss_fn)

    for i in range(10):
        step(*data[i % 4]).item()
    with cgtools.instrumented():
        for i in range(steps):
            step(*data[i % 4])
    return "done"


def _local_instr(model: str, adam_kind: str, steps: int, tmp: str) -> str:
    sys.path.insert(0, str(HERE))
    from daemon_ab import _total

    out = Path(tmp) / f"cg.local.{model}"
    cmd = [*cgtools.valgrind(out), sys.executable, __file__, "--local-instr", model, "--adam", adam_kind,
           "--steps", str(steps)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return f"local step {_total(out) / steps / 1e3:8.1f}k instructions (Adam: {adam_kind})"


def _instr(model: str, path: str, steps: int, tmp: str, python: str = sys.executable) -> str:
    """`--replay-instr`'s count of `path` by `python` (round 53: `--against`'s, which imports that checkout's
    gpupool: the whole worker's step, the kernels' copies a rewrite of the graph adds included)."""
    sys.path.insert(0, str(HERE))
    from daemon_ab import KERNELS, _inclusive, _total

    out = Path(tmp) / f"cg.{model}"  # (read before the next count writes it)
    cmd = [*cgtools.valgrind(out), python, __file__, "--replay-instr", path, "--steps", str(steps)]
    subprocess.run(cmd, check=True, capture_output=True)
    total, kernels = _total(out) / steps, _inclusive(out, KERNELS)[0] / steps
    return (f"worker per RunGraph {total / 1e3:8.1f}k instructions: TorchScript call {kernels / 1e3:8.1f}k, "
            f"outside it {(total - kernels) / 1e3:8.1f}k")  # fmt: skip


def _fresh(s: Any, c: Any) -> list[int]:
    """A command's outputs and the inputs `_worker`'s `command` bound for it (uploads)."""
    first = (s.number << 32) + (1 << 28)
    return [h for h in [*c.run_graph.outputs, *c.run_graph.inputs] if h >= first]


def _recording(fn: Any, calls: list[tuple[Any, Any, Any]]) -> Any:
    def rec(*a: Any, **k: Any) -> Any:
        calls.append((fn, a, k))
        return fn(*a, **k)

    return rec


def _no_reply(item: Any) -> None:
    raise AssertionError("graph commands are not answered")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mlp,encoder", help="comma-separated launch_bound workloads")
    p.add_argument("--steps", type=int, default=50, help="replays per measurement")
    p.add_argument("--repeats", type=int, default=7, help="measurements (the min counts)")
    p.add_argument("--adam", choices=("capturable", "fused"), default="capturable",
                   help="the captured step's Adam: capturable=True, or fused=True (both with a device lr)")  # fmt: skip
    p.add_argument("--dump", nargs=2, metavar=("MODEL", "FILE"), help=argparse.SUPPRESS)
    p.add_argument("--replay", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--replay-instr", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--local-instr", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--outside-instr", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--outside-cpu", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--outside-slice-instr", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--sliced", action="store_true", help=argparse.SUPPRESS)
    modes = ("cpu", "instr", "outside", "outside-slice", "outside-cpu", "outside-slice-cpu")
    p.add_argument("--measure", choices=modes, default="cpu", help="instr: the worker's "
                   "instructions per RunGraph under callgrind (20 runs), in and out of its TorchScript call, and "
                   "launch_bound's local step's (the same --adam; exact); outside: the worker's own instructions "
                   "per RunGraph with the TorchScript call taken out (its outputs returned as a real run made "
                   "them); outside-slice: the same, each RunGraph a slice of one command from its frame's bytes "
                   "(the frame's parse, the slice's loop and its result counted too); outside-cpu: outside's, the "
                   "thread's CPU time (min and median of --repeats); outside-slice-cpu: outside-slice's")  # fmt: skip
    p.add_argument("--against", metavar="DIR", help="instr, outside, outside-slice: also count checkout DIR's worker "
                   "(this bench run by --against-python, which imports DIR's gpupool) on the same dumped graphs, "
                   "side by side")  # fmt: skip
    p.add_argument("--against-python", default=sys.executable, help="the python that imports DIR's gpupool")
    args = p.parse_args(argv)
    if args.dump:
        dump(*args.dump, args.adam)
        return 0
    if args.replay:
        print(replay(args.replay, args.steps, args.repeats))
        return 0
    if args.local_instr:
        print(local_instr(args.local_instr, args.adam, args.steps))
        return 0
    if args.replay_instr:
        print(replay_instr(args.replay_instr, args.steps))
        return 0
    if args.outside_instr:
        print(outside_instr(args.outside_instr, args.steps))
        return 0
    if args.outside_cpu:
        print(outside_cpu(args.outside_cpu, args.steps, args.repeats, args.sliced))
        return 0
    if args.outside_slice_instr:
        print(outside_slice_instr(args.outside_slice_instr, args.steps))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            path = str(Path(tmp) / f"{model}.pt")
            dump_argv = ["--dump", model, path, "--adam", args.adam]
            subprocess.run([sys.executable, __file__, *dump_argv], check=True, capture_output=True)
            if args.measure in ("outside-cpu", "outside-slice-cpu"):
                argv = ["--outside-cpu", path, "--steps", str(args.steps), "--repeats", str(args.repeats)]
                argv += ["--sliced"] if args.measure == "outside-slice-cpu" else []
                out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True)
                print(f"{model:10s} {out.stdout.strip()}", flush=True)
                continue
            if args.measure in ("outside", "outside-slice"):
                flag = f"--{args.measure}-instr"
                against = (args.against_python, args.against) if args.against else None
                print(f"{model:10s} {_outside(model, path, min(args.steps, 20), tmp, flag, against)}", flush=True)
                continue
            if args.measure == "instr":
                print(f"{model:10s} {_instr(model, path, min(args.steps, 20), tmp)}", flush=True)
                if args.against:  # (round 53) the same dumped graph by that checkout's worker
                    line = _instr(model, path, min(args.steps, 20), tmp, args.against_python)
                    print(f"{'  base':10s} {line}", flush=True)
                print(f"{model:10s} {_local_instr(model, args.adam, min(args.steps, 20), tmp)}", flush=True)
                continue
            argv = ["--replay", path, "--steps", str(args.steps), "--repeats", str(args.repeats)]
            out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True)
            print(f"{model:10s} {out.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
