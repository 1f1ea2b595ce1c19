"""Why a worker's learned runs (server/runs.py) are as long as they are, and how often the native runner returns.

Replays a recording of `eager_replay.py --dump MODEL FILE` as that script does (the warm-up frames, then the timed
ones, in slices of --slice-commands through `slices.run_commands`), with the executor watched:

- where each recording of the warm-up ended (`CommandExecutor._learn`'s caller): at a record that matched a learned
  run's first step ("met a run"), at a record that hit no template or failed ("no template"), or where the span of
  eager records ended ("span end": an upload, a free, a get, the slice's end);
- the learned runs and their lengths;
- over the timed slices: the native runner's `Ctx.run` calls, why each returned (END: its run ended and nothing
  went on; not taken; the next record did not match; the span ended at another command; the slice ended), and how
  many records each ran;
- per training step, the timed eager records that ran natively, in Python inside a learned run, and outside any run,
  with the reason each one in Python held its step back from the native runner (`native_runner.refusal`: `seeded`,
  `reshapes`, `uninitialized`, `check`, another step kind the runner does not express, or a step it compiled whose
  record it did not take) and the ops behind each reason.

    python bench/eager_replay.py --dump tiny-mlp /tmp/tiny.json
    python bench/run_census.py /tmp/tiny.json          # this tree; run it with another checkout's python for its
    cd /work/base && .venv/bin/python /work/wt/NAME/bench/run_census.py /tmp/tiny.json    # (that checkout's code)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recording", help="a file of eager_replay.py --dump")
    p.add_argument("--slice-commands", type=int, default=128, help="commands per slice (the fair queue's 128)")
    args = p.parse_args(argv)
    from gpupool.server import slices
    from gpupool.server.devices import FakeDevice
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    from gpupool._proto import device_pb2

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    d = json.loads(Path(args.recording).read_text())
    frames = [bytes.fromhex(f) for f in d["frames"]]

    def cut(part: list[bytes]) -> list[bytes]:
        spans = [bytes(span) for f in part for _, span in slices.split_frame(f, 1 << 20)]
        n = args.slice_commands
        return [b"".join(spans[i : i + n]) for i in range(0, len(spans), n)]

    warm, timed = cut(frames[: d["start"]]), cut(frames[d["start"] : d["end"]])
    ex = CommandExecutor(slices.SliceLedger())
    ex.exclusive_rng = True
    dev = FakeDevice(0, "census", 1 << 34)
    s = WorkerSession("census", d["number"], dev, DeviceMemory(dev), 1 << 33)
    ended: collections.Counter[str] = collections.Counter()
    learn, span = ex._learn, ex.eager_span
    lines = {"met a run": "a learned run starts here", "no template": "no template hit"}

    def watched_learn(known: Any, session: Any) -> None:
        if known.rec:
            caller = sys._getframe(1)
            import linecache

            text = linecache.getline(caller.f_code.co_filename, caller.f_lineno - 1)
            why = next((k for k, v in lines.items() if v in text), "span end")
            ended[why] += 1
        learn(known, session)

    ex._learn = watched_learn  # type: ignore[method-assign]
    current: dict[str, Any] = {}
    returns: collections.Counter[str] = collections.Counter()
    taken: collections.Counter[int] = collections.Counter()
    timing = [False]
    native = ex.native
    if native is not None:

        class Ctx:
            def __init__(self, *a: Any) -> None:
                self.ctx = native.Ctx(*a)

            def run(self, *a: Any) -> Any:
                got = self.ctx.run(*a)
                if timing[0]:
                    j, records, cmds = got[0], a[2], current["commands"]
                    if got[3] & 1:
                        why = "END"
                    elif j >= len(records):
                        why = "slice end"
                    elif not records[j]:
                        why = "span end: " + str(cmds[j].WhichOneof("cmd"))
                    elif got[4] is not None:
                        why = "the op raised"
                    else:
                        why = "not taken" if not got[2] else "no match"
                    returns[why] += 1
                    taken[got[2]] += 1
                return got

            def __getattr__(self, name: str) -> Any:  # (`between`: the module's Ctx's own)
                return getattr(self.ctx, name)

        ex.native = type("Native", (), {"Ctx": Ctx, "__getattr__": lambda _, name: getattr(native, name)})()

    def watched_span(session: Any, commands: Any, *a: Any) -> Any:
        current["commands"] = commands
        return span(session, commands, *a)

    ex.eager_span = watched_span  # type: ignore[method-assign]
    from gpupool.server import native_runner

    held: collections.Counter[str] = collections.Counter()  # timed records of a run on the Python path, by reason
    held_ops: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    outside: collections.Counter[str] = collections.Counter()  # timed eager records on the normal path, by op
    run_op = ex._run_op
    from gpupool.server import runs

    match = runs.match

    def why(step: Any) -> str:
        if native is None:
            return "no native runner"
        refusal = getattr(native_runner, "refusal", None)
        if refusal is not None:
            return refusal(native, step, dev.torch_device) or "compiled, record not taken"
        # a checkout from before round 23 (`--against`-style runs with its python): its `_compile`'s refusals
        extras = [x for x in ("reshapes", "seeded", "uninitialized") if getattr(step.plan, x)]
        if extras or step.check:
            return extras[0] if extras else "check"
        return "compiled, record not taken" if native_runner._plan(native, step, dev.torch_device) else "other"

    def watched_match(step: Any, *a: Any) -> Any:
        got = match(step, *a)
        if got is not None and timing[0]:  # the record runs in Python as this step (or fails)
            reason = why(step)
            held[reason] += 1
            held_ops[reason][step.plan.name] += 1
        return got

    def watched_op(session: Any, plan: Any, *a: Any, **kw: Any) -> Any:
        if timing[0]:
            outside[plan.name] += 1
        return run_op(session, plan, *a, **kw)

    runs.match = watched_match
    ex._run_op = watched_op  # type: ignore[method-assign]

    @contextlib.contextmanager
    def clock() -> Any:
        yield [0.0]

    def run(payload: bytes) -> None:
        req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, payload)
        slices.run_commands(s, ex.execute, ex.ledger, req, clock, slices.word_mark(bytearray(4)))

    for payload in warm:
        run(payload)
    known = ex._eager["census"][3]
    print(f"warm-up: recordings that became runs ended at: {dict(ended)}")
    traces = [t for seen in known.heads.values() for t in seen]
    hits, natives = known.hits, known.native
    timing[0] = True
    for payload in timed:
        run(payload)
    print(f"learned runs after the warm-up: {len(traces)}, steps each: {sorted(len(t.steps) for t in traces)}")
    kinds = collections.Counter(
        c.WhichOneof("cmd") for p in timed for c in device_pb2.ClientFrame.FromString(p).commands
    )
    print(f"timed: {len(timed)} slices, commands {dict(kinds)}; records in runs {known.hits - hits}, of them native "
          f"{known.native - natives}")  # fmt: skip
    calls = sum(returns.values())
    print(f"Ctx.run calls: {calls} ({calls / max(1, len(timed)):.1f} a slice); returned at: {dict(returns)}")
    print(f"records per call: {dict(sorted(taken.items()))}")
    steps = d["steps"]
    ran, nat = known.hits - hits, known.native - natives
    out_n = sum(outside.values())
    print(f"per training step ({steps} timed): native {nat / steps:.1f}, Python in a run {(ran - nat) / steps:.1f}, "
          f"outside any run {out_n / steps:.1f} records")  # fmt: skip
    for reason, n in held.most_common():
        ops = ", ".join(f"{name} {c / steps:g}" for name, c in held_ops[reason].most_common(6))
        print(f"  held back by {reason}: {n / steps:.1f} a step" + (f" ({ops})" if ops else ""))
    if outside:
        ops = ", ".join(f"{name} {c / steps:g}" for name, c in outside.most_common(6))
        print(f"  outside any run: {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
