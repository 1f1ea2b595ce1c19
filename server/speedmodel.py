"""A speed model for fake GPUs: each op completes no earlier than its modelled time on a declared device.

`gpupool serve --fake-gpus 4 --fake-gpu-tflops T --fake-gpu-gbps B --fake-link-gbps L` makes every op of a
fake GPU take at least `max(flops / T, bytes / B)` (FLOPs from torch's own `torch.utils.flop_counter`
formulas, bytes = the op's tensor inputs and outputs), and every collective at least its ring time on a link
of `L` GB/s (allreduce moves `2 (N-1)/N` of the buffer per rank, allgather/reduce_scatter `(N-1)/N`). The true
result is still computed on the CPU; the model only waits (sleeping, so N modelled GPUs run concurrently on
fewer cores). Scaling benchmarks use it: bench/ddp_scaling.py. Off (all zero) by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry

LAUNCH_SECONDS = 5e-6  # a kernel launch: even an empty op costs this on a real GPU


@dataclass(frozen=True)
class SpeedModel:
    tflops: float = 0.0  # declared peak, 10^12 FLOP/s (0: no compute model)
    gbps: float = 0.0  # declared memory bandwidth, 10^9 bytes/s (0: no memory model)
    link_gbps: float = 0.0  # declared link between daemons, 10^9 bytes/s (0: no link model)

    @property
    def active(self) -> bool:
        return self.tflops > 0 or self.gbps > 0

    def op_seconds(self, op: Any, args: Any, kwargs: Any, out: Any) -> float:
        """Modelled time of one op."""
        flops = 0.0
        formula = flop_registry.get(getattr(op, "overloadpacket", None))
        if formula is not None and self.tflops > 0:
            try:
                flops = float(formula(*args, **kwargs, out_val=out))
            except Exception:  # a formula that does not fit these arguments models nothing
                flops = 0.0
        nbytes = sum(_bytes(a) for a in args) + sum(_bytes(v) for v in kwargs.values()) + _bytes(out)
        compute = flops / (self.tflops * 1e12) if self.tflops > 0 else 0.0
        memory = nbytes / (self.gbps * 1e9) if self.gbps > 0 else 0.0
        return LAUNCH_SECONDS + max(compute, memory)

    def hold_op(self, op: Any, args: Any, kwargs: Any, out: Any, started: float) -> None:
        """Wait until the op's modelled time since `started` (perf_counter) has passed."""
        _sleep_until(started + self.op_seconds(op, args, kwargs, out))

    def hold_collective(self, kind: str, nbytes: int, ranks: int, started: float) -> None:
        if self.link_gbps <= 0 or ranks < 2:
            return
        share = 2 * (ranks - 1) / ranks if kind == "allreduce" else (ranks - 1) / ranks
        _sleep_until(started + share * nbytes / (self.link_gbps * 1e9))


def _bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_bytes(v) for v in value)
    return 0


def _sleep_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > 0:
        time.sleep(left)
