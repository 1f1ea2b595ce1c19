"""`gpupool run --cuda`: the leased devices look like CUDA to a script that never heard of gpupool.

torch calls `autoload()` at the end of `import torch` (the `torch.backends` entry point of this
distribution; off with TORCH_DEVICE_BACKEND_AUTOLOAD=0). It does nothing unless $GPUPOOL_CUDA is set
(`gpupool run --cuda` sets it for its child; launchers such as torchrun pass it on to their workers), so
`--cuda` never changes a script run without it ($GPUPOOL_CLIENT=native loads the C++ client first: `autoload`).
When set, `enable()`:

- registers the `gpupool` device (as `import gpupool.torch` does: the C++ client, gpupool.client.native, `gpupool
  run`'s default client, or the Python shim under `gpupool run --client shim --cuda` or without `gpupool run`),
- maps `cuda`, `cuda:N`, integer device ids, `.cuda()`, `.to(...)`, factory `device=` arguments and
  `tensor.is_cuda` onto `gpupool:N` (devices.py: wrappers of the torch functions that take a device, found in
  torch's own schemas and docstrings; every other call runs at torch's speed),
- answers `torch.cuda.*` from the lease (facade.py),
- maps `torch.load(map_location=...)`, autocast/GradScaler, runs `torch.compile`'s model eagerly, and refuses what
  cannot work on a pooled GPU with one message naming the call (patches.py),
- maps `init_process_group("nccl")` onto the `gpupool` collective backend (nccl.py; on either client),

and logs one line saying so. docs/cuda.md lists every API and the limits. In a process of `gpupool run` without
`--cuda` ($GPUPOOL_LEASE set, $GPUPOOL_CUDA not), a script that dies of torch's "Torch not compiled with CUDA enabled"
(or another "no CUDA here" error) gets one more line saying to run it with `--cuda` (hint.py).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("gpupool.cuda")

ENV = "GPUPOOL_CUDA"
_enabled: list[bool] = []


def requested() -> bool:
    """Whether this process asked for the CUDA mapping ($GPUPOOL_CUDA set to anything but 0/false/no)."""
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _is_gpupool_program() -> bool:
    """The daemon, scheduler and `gpupool run` import torch too: they never get the mapping."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return name.startswith("gpupool.") or os.path.basename(sys.argv[0] if sys.argv else "") == "gpupool"


def autoload() -> None:
    """torch's `torch.backends` entry point: runs at `import torch` in every process, so it is cheap. It also loads the
    C++ client as the `gpupool` device with $GPUPOOL_CLIENT=native (set by `gpupool run` where it chose the C++ client,
    its default: gpupool.client.native), under the mapping with $GPUPOOL_CUDA too."""
    if _is_gpupool_program():
        return
    from gpupool.client import checkpoints, native

    checkpoints.register()  # torch.load of a checkpoint saved on gpupool: onto the device, or one clear error

    if native.requested():
        native.enable()
        from . import accel

        accel.install()  # torch.accelerator.synchronize() and its memory API on the device (accel.py)
    if requested():
        enable()
    elif os.environ.get("GPUPOOL_LEASE"):  # under `gpupool run` without --cuda: a CUDA script's error gets one hint
        from . import hint

        hint.install()
    if os.environ.get("GPUPOOL_LEASE"):
        freeze_imports()


def freeze_imports() -> None:
    """In a process of `gpupool run` ($GPUPOOL_LEASE): what exists at the end of `import torch` (torch's ~165k objects,
    the client's modules) moved out of the garbage collector's sight (`gc.freeze`): the interpreter's exit traversed
    them in its final collections, ~0.4 s of CPU of its ~0.5 s after the last atexit handler (round 56: at load 15-20 a
    script's exit took 5-9 s, 2-2.5 s since: bench/run_exit.py), and each full collection while it runs ~0.07 s. The
    script's own objects, made after, are collected as ever (a file held in a reference cycle still flushed at exit);
    an object of these that later becomes cyclic garbage stays (a module's, rarely). GPUPOOL_GC_FREEZE=0 leaves them
    to the collector."""
    if os.environ.get("GPUPOOL_GC_FREEZE", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    import gc

    gc.freeze()


def enable() -> None:
    """Install the mapping (idempotent)."""
    if _enabled:
        return
    _enabled.append(True)
    import gpupool.torch  # noqa: F401 - registers the device

    from . import accel, devices, facade, legacy, patches

    devices.install()
    facade.install()
    legacy.install()
    accel.install()
    patches.install()
    _announce()


def enabled() -> bool:
    return bool(_enabled)


def on_native() -> bool:
    """Whether the `gpupool` device under the mapping is the C++ client (`gpupool run --cuda`'s default client)."""
    from gpupool.client import native

    return native.active()


def _announce() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gpupool --cuda: %(message)s"))
    if not log.handlers:
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)
    from .facade import leased_count

    if on_native():
        log.info(
            "cuda -> gpupool (%d leased device(s), native client): device strings/ids, .cuda(), .to(), device=, "
            "is_cuda, torch.cuda.*, torch.load(map_location), autocast/GradScaler, pin_memory, nccl -> gpupool "
            "backend, torch.compile -> eager; refused: CUDA graphs, CUDA extensions, DataParallel (docs/cuda.md)",
            leased_count(),
        )
        return
    log.info(
        "cuda -> gpupool (%d leased device(s)): device strings/ids, .cuda(), .to(), device=, is_cuda, torch.cuda.*, "
        "torch.load(map_location), autocast/GradScaler, pin_memory, nccl -> gpupool backend, torch.compile -> eager; "
        "refused: CUDA graphs, CUDA extensions, DataParallel (docs/cuda.md)",
        leased_count(),
    )
