"""One line for a CUDA script run under `gpupool run` without `--cuda`.

Without `--cuda` the leased GPUs are the `gpupool` device only: a script that says `device = "cuda"` reaches torch's
own CUDA, which a CPU-only torch (or a host without a GPU) does not have, and it dies with torch's "Torch not compiled
with CUDA enabled" (or "Found no NVIDIA driver on your system", ...), which says nothing of the lease it holds.
`install()` (called by `autoload` at `import torch` in a process that holds a `gpupool run` lease and did not ask for
the mapping) wraps `sys.excepthook`: where the uncaught exception, or one in its chain, is one of torch's "no CUDA
here" errors (`NO_CUDA`), one line after torch's traceback says to run it with `--cuda`. Nothing else changes: no
torch function is wrapped (tests/cuda_scripts/no_cuda.py), a caught exception prints nothing, and the exit status is
the script's.

The other way round: a device-agnostic script (`device = "cuda" if torch.cuda.is_available() else "cpu"`) under plain
`gpupool run` never fails, it trains on the local CPU and the leased GPU idles. Every session the client attaches
(`Session.attach`, each client's one way to a daemon) marks `attached` in the same folder (`mark_attached`); where the
command ends with neither that mark nor the hint's (`unused`), `gpupool run` prints `UNUSED` after it.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

# What torch raises where a script asks for CUDA that this process lacks (CPU-only builds and GPU-less hosts).
NO_CUDA = (
    "Torch not compiled with CUDA enabled",  # torch.cuda._lazy_init: .cuda(), device="cuda", torch.cuda.* calls
    "Found no NVIDIA driver on your system",  # a CUDA build on a host without a driver
    "No CUDA GPUs are available",
    "CUDA driver initialization failed",
    "on a CUDA device but torch.cuda.is_available() is False",  # torch.load of a checkpoint saved on a GPU
    "torch.cuda.Stream requires CUDA support",
    "Tried to instantiate dummy base class Event",  # torch.cuda.Event on a CPU-only build
    "Distributed package doesn't have NCCL built in",  # init_process_group("nccl")
    "module 'torch._C' has no attribute '_cuda_",  # torch.cuda.set_device and other bindings a CPU build lacks
)
HINT = (
    "gpupool run: this script asked for CUDA, which this process does not have: the leased GPUs appear as CUDA "
    "devices only under `gpupool run --cuda` (run it again as `gpupool run --cuda ... -- COMMAND`; docs/cuda.md)"
)
# `gpupool run` (without --cuda) names a private folder of its own here, removed when its command exits: the first
# process of the run to print the hint makes `printed` in it, and the others (torchrun's ranks, each dying of the same
# error) print none: until journey42 a 2-rank torchrun printed it twice.
DIR_ENV = "GPUPOOL_CUDA_HINT_DIR"
UNUSED = (
    "gpupool run: the command attached no session to its lease's GPU(s), so whatever it ran ran on this machine's CPU: "
    "for a CUDA script, run it with --cuda (`gpupool run --cuda ... -- COMMAND`; docs/cuda.md)"
)
_installed: list[bool] = []
_marked: list[bool] = []


def mark_attached(mark: str = "attached") -> None:
    """Say in $GPUPOOL_CUDA_HINT_DIR (where set) that a process of this run attached a session (once a process), or
    (`mark` "looked") that it showed the lease's sessions: `gpupool run -- gpupool smi` uses its lease's tokens, on
    purpose without a session, and until round 43 got `UNUSED` ("whatever it ran ran on this machine's CPU ...
    --cuda") after its tables."""
    folder = os.environ.get(DIR_ENV)
    if not folder or _marked:
        return
    _marked.append(True)
    try:
        os.close(os.open(os.path.join(folder, mark), os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError:  # the folder is gone (the run ended) or not ours: the note is advice, the session is what counts
        pass


def unused(folder: str) -> bool:
    """Whether no process of the run whose folder this is attached a session or showed the lease's (smi), and none
    printed `HINT`."""
    return not any(os.path.exists(os.path.join(folder, name)) for name in ("attached", "looked", "printed"))


def first() -> bool:
    """Whether this process is the first of its `gpupool run` to print the hint ($GPUPOOL_CUDA_HINT_DIR); True
    without the folder or where it cannot say (a hint twice rather than none)."""
    folder = os.environ.get(DIR_ENV)
    if not folder:
        return True
    try:
        os.close(os.open(os.path.join(folder, "printed"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def wants_cuda(exc: BaseException | None) -> bool:
    """Whether `exc` or an exception it was raised from or during is one of torch's "no CUDA here" errors."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if any(marker in text for marker in NO_CUDA):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def install() -> None:
    """Wrap `sys.excepthook` (idempotent): torch's traceback as before, then `HINT` where `wants_cuda`."""
    if _installed:
        return
    _installed.append(True)
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        previous(kind, exc, tb)
        try:
            if wants_cuda(exc) and first():
                print(HINT, file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - a hint must never hide the script's own error
            pass

    sys.excepthook = hook
