"""Backward on the calling thread, for both clients of the `gpupool` device (client/torch/backend.py says why).

torch's autograd engine hands the nodes of a device's tensors to one worker thread per device index, sized once from
the device guard's count at the process's first backward. A gpupool op only queues a record for its daemon, so those
threads buy nothing but a thread hand-off per device change in a backward (a model split over gpupool:0 and gpupool:1
crosses twice a step); with autograd's multithreading off for the call, every node runs on the caller's CPU queue, in
the same order, whatever its device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.variable import Variable

_Engine: Any = type(Variable._execution_engine)


class CallingThreadEngine(_Engine):  # type: ignore[misc, valid-type]
    """torch's autograd engine, with multithreading off while it runs a backward: every node runs on the thread that
    called backward()/grad(), whatever its device index."""

    def run_backward(self, *args: Any, **kwargs: Any) -> Any:
        prev = torch._C._is_multithreading_enabled()
        torch._C._set_multithreading_enabled(False)
        try:
            return super().run_backward(*args, **kwargs)
        finally:
            torch._C._set_multithreading_enabled(prev)


def run_backward_on_calling_thread() -> None:
    if not isinstance(Variable._execution_engine, CallingThreadEngine):
        Variable._execution_engine = CallingThreadEngine()
