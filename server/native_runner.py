"""The native runner: a learned run's `fast` steps (server/runs.py) matched and run in C++ (`native_runner.cpp`).

A session worker spends ~700 interpreter bytecodes per record of a learned run on `runs.match` and the inline path of
`CommandExecutor.eager_span`. For a step that qualifies (`compile_trace`), the C++ runner does the same per record:
the record's length and fixed bytes against the template's, its handles read at their offsets (the length is
checked first, so every read is in bounds), each input looked up in the session's own table
(`WorkerSession.tensors`; with the Python int the context bound or last looked that handle up under, kept per
context: `Keys`, a cache of ints by value),
an input a step of the run bound must be that very tensor, an external one must have the learned dtype, sizes,
strides and storage offset; the output handle's checks (this session's, not reserved, not live), the handle limit,
the quota and the device's capacity against the learned verdict; then the op, called boxed through its
`OperatorHandle` as torch's Python binding calls it (the GIL released, errors and warnings translated by
torch's own handler), `s.ops`, the ledger's count, the output bound into the session's table with its storage
counted as `WorkerSession.bind_new` does, and the quota checked after it. It runs consecutive records of a run for as
long as each matches its step; where no run is under way (also where a record ended the run under way, and while the
Python path records the normal path's records), `CommandExecutor.eager_span` offers it the first steps of the
runs the Python path would try (`_native_candidates`). A run that ends goes on in C++ into the run that followed it the
last time (`runs.Trace.next`, the one the Python path tries first; `compile_trace` gives the native form a weak
reference to its `runs.Trace` for it), if that one is alive, learned under the session's quota and compute bound,
compiled, and its first step runs here: from that step, with a fresh list of kept outputs and every check above; where
that step does not take the record, into the run that followed it the time before (`runs.Trace.alt`: a run met at two
places of a step, say a transformer's layers, is followed by one run at each) the same way; where neither takes the
record the result is the first run's end, as without it (`Ctx.run`'s last element then None,
else the `runs.Trace` under way and its kept outputs). Before each record's op it marks the slice's progress: a worker's
mark (`slices.word_mark`, a word of memory shared with the daemon) it stores itself, any other mark it calls. Its
context (`Ctx`: the session's tables, quota, handle limit, compute bound) is kept per session from slice to slice
(`CommandExecutor._native_ctx`) and made again when any of those changed. A record it cannot take (no match, a check
that fails, a step that does not qualify) goes back to the Python path untouched (nothing above has a side effect
before the op runs), which then runs or refuses it exactly as without the runner; an op that raises reports its
exception to the Python loop, which records it as the Python path would have. Each input tensor is held by a second
C++ reference until the op returned, so the kernel, which runs with the GIL released, never drops the last one (which
would take the GIL to hand the tensor's Python object back). In a session's own worker process (`exclusive_rng`) with
a word mark, while its thread is the interpreter's only one (round 42), an op called as itself runs with the GIL kept
(no other Python thread can wait for it; its release and reacquisition were ~410 instructions an op) and its inputs are
pinned instead (`Pins`): one count of the runner's own on each TensorImpl, added and taken away without torch's PyObject
hooks (`incref_pyobject` at 1 -> 2 references, `decref_pyobject` at 2 -> 1, each a `gil_scoped_acquire`: ~250
instructions an input), the hooks' state put right at the release (an op that returned its input); no Python code runs
while a pin is held. Anywhere else (another Python thread, a callable mark, sessions sharing the process, a Python
run) the GIL is released per op and the inputs held as before. The session's and the device's counters (`used`, `ops`)
are read and written in their instance dicts where Python's own attribute access would (the generic getattr and
setattr, no data descriptor of that name), through getattr and setattr otherwise. Within one `Ctx.run` they are kept
in C++ (`Counter`): read once, added to per record, and written back as one `+=` each before any session or executor
code the run calls (a progress mark that is a callable, the ledger's count, `_bind_outputs`, `_over_quota`), when it
returns and when it raises, then read again: Python code of the worker's thread never sees them lag a record run.
A one-chunk upload or a free among a
run's records (a training step's batch, the client's batched frees) runs inside `Ctx.run` too, and the run goes on
after it (`Ctx::between`, round 40: before, each one left `Ctx.run` for `CommandExecutor.execute`, ~46k instructions
an upload in `_upload`, and the records after it came back into a new call): the slice's small uploads and frees in
canonical form come with its records as their commands' bytes (`eager_frame`'s fifth element,
`slices.FrameCommands.between`), on a fake GPU's session of `WorkerSession`'s own class. A free runs as `free` below
(with the context's handle ints; one that raises midway, after freeing the handles before, hands its exception back
for Python to record as `execute` does). An upload runs here where `_upload` would take its `filled` path (a
fake GPU's session of `WorkerSession`'s own class, offset 0 with meta, the last chunk, exactly the tensor's bytes, a
bool's each 0 or 1, a known dtype, within the quota and the device's capacity with no upload pool memory to let go
first, the handle this session's, not reserved, within the handle limit, no upload in progress): checked in
`_upload`'s order before anything is done, then the progress mark, the tensor made and filled, the handle's old
tensor unbound (a failed one forgotten), the new one bound as `bind_new` binds, the ledger's transfer. After either,
a kept output of the run that only the run's list still holds (a freed or uploaded-over handle's old tensor) is
dropped from the list, as the Python path holds kept outputs weakly across such a command. Any other upload or free
goes back to the Python path untouched.
A `Free` command runs here too
(`free`, called by `CommandExecutor.execute`): `WorkerSession.free` step for step, the handles read from the
message's bytes (a message it does not read, or a session class with its own `free`, takes `WorkerSession.free`);
each table's entry taken with one `pop` (`dict_pop`) rather than a lookup and a delete, each handle's int the one the
session's context bound it under where its cache holds it (`CommandExecutor._native_keys`: found by identity, no int
made per handle). A storage entry (`[handles, bytes]`) it deletes with nothing else referring to it is kept (at most
1,024 in the process, `Entries`) and filled again with `[1, nbytes]` by the next new storage the runner binds,
rather than a new list per output; the storage table is read and written with the key's hash given, and the bytes
freed are summed in C while each entry's byte count is a plain int (round 41). An op's output (a record's, an
upload's) is moved into its Python object, which then holds the tensor's only reference: no C++ reference is left
beside it whose end would drop the object's (torch's `decref_pyobject`, a GIL acquisition, ~150 instructions an
output).
A slice's commands are read from the frame's bytes (`eager_frame`, `slices.frame_commands`): a plain eager record (only
`eager_op` fields, in protobuf's canonical form) is taken as it is, and upb parses only the other commands, copied into
one frame of their entries before anything runs (a malformed one fails there, as the whole frame's parse did); a frame
of any other form is parsed whole and its records read by `eager_records` (`slices.eager_records`: the oneof's last
member decides, as for the parser; a frame with any other field or wire type is left to the parsed messages). The
message of a plain record's command is made only where something asks for it (`slices.FrameCommands`: a record that
fails on the Python path). A frame of RunGraphs only (round 43 for one, round 44 for several: a captured step's, or a
batch of them) is not parsed at all where each graph's quiet run takes it: `graph_frame` reads the frame (each
RunGraph's bytes and its `graph_id` as upb reads it, or None for any form a parser might refuse) and
`GraphPlan.run_raw` each RunGraph's bytes as they came (`CommandExecutor.run_graph_raw`); a run it declines is parsed
on its own and executed as any other. Since round 49 (`eager_frame` with `lazy`) upb does not parse a slice's small
uploads and frees in canonical form either where `parse_upload` / `parse_free` read their messages (each key one byte,
each field once: a message upb takes, to the same fields); their messages are made from their bytes only where Python
asks for one (`slices.FrameCommands`), and any other goes to upb before anything runs, as before. Since round 50 one
such upload or free outside a learned run (a step's first uploads, a free after a run ended: `slices._loop`,
`eager_span`) runs from its bytes too (`Ctx.between`, `CommandExecutor.run_between`: `Ctx::between`'s checks and
paths, as among a run's records); one it leaves to Python (a failing check, a chunk) gets its message then. The daemon's
front, too, imports the cached build (`built`: never a build there) for two functions: `split_frame`, the stream
reader's cut of every frame into its commands' spans (`slices.split_frame`), which hands any frame it does not accept
back to the Python reading, and `plain_uploads` (round 49, `slices.unread_bulk`): of a small frame's Uploads and
Gets, those its check still has upb parse (an Upload `parse_upload` reads, no `bulk_bytes`, is passed over).
A captured step's run (server/graph.py, round 40) takes three functions of it: `quiet_externals`, a quiet run's
persistent tensors out of the session's table, each the object its weak reference names, into their slots (None,
nothing written, where one is not: the Python reads them the slow way and checks their metadata); `rebind_run`,
`WorkerSession.rebind_all` of the run's outputs and kept tensors step for step (False, nothing done, for a value that
is not a tensor or a session whose tables are not dicts: then `rebind_all` runs); and `filled`, an input sent by
value made and copied in one call. A traced graph's quiet run on the CPU takes one call (`GraphPlan.run`, round 41:
graph._quick): `_run`'s checks in its order (the counts, each input's metadata or its bytes sent by value, the
persistent tensors as `quiet_externals` finds them, the output handles), the inputs sent by value made, the
traced function called with its arguments picked from the slots, its kept tensors put into their slots and
`rebind_run`; a check that fails returns None before anything is done (the Python path then runs the command and
raises its error), an exception of the traced function is returned for the Python to convert as `Traced.run` does.

A step qualifies when it has none of `_run_step`'s per-op extras but a random op's (`_extras`: no op that reshapes a
storage in place, no value guard run per record but one the runner makes itself (`_guard`): value ranges of tensor
arguments (`guards.index_ranges`: `embedding_dense_backward`'s indices in [0, num_weights), their smallest and
largest values read per record as the guard reads them, `in_ranges`), or the devices of pairs of tensor arguments
where the guard reads nothing else a step does not fix (`guards.fixed_guard`: the attention backward's with
dropout, `same_devices`); a record outside them goes to the Python path, which raises the guard's error. A
factory that takes the session's device, an op returning
several tensors, an op returning nothing whose record names no output handle (an in-place `_foreach_` op of the C++
client's), and a factory of uninitialized memory returning one tensor, whose output's storage the runner zeroes as
`_run_step` does before binding it, do qualify), its op is a plain `OpOverload` run as itself, or
a fake GPU's faster composition of it (server/fallbacks.py FASTER: `native_dropout` and its backward), or the fused
attention's composition (server/attention.py REPLACEMENTS: the forward's tuple of tensors, None and ints bound by
`_bind_outputs` as the Python path binds it) (each called as
`_run_step` calls it, the template's arguments positionally or by keyword as the record gave them, its tensors the
session's own objects and its view arguments the dispatcher's, as `compact.view_of` makes them; checked per record:
while its `OpPlan.run` is something else, another replacement, another fallback or a wrapper, its records take the
Python path), and every
variable field of its template is the output handle, a tensor handle (`Tensor`, `Tensor?`, `Tensor[]`, `Tensor?[]`;
also a view argument's, `compact.VIEW`, and a view element's of a tensor list with views, `compact.VIEWS`: its
tensor is checked as any input's, then `compact.view_of`'s checks run against its storage as it is now, for every
record, and the geometry is applied: for a plain dense CPU tensor as `aten::as_strided`'s CPU kernel applies it
(`at::native::as_strided_tensorimpl`, which checks the storage bounds once more), without the dispatcher's autograd
and view-tracking layers that the daemon, recording no autograd history, has no use for; for an op that returns an
argument of its own (an in-place op's `Tensor(a!)`), whose output handle would bind the view itself, and for a
Python run, as the dispatcher makes it (the same CPU kernel, then its ADInplaceOrView kernel's `as_view`, called
directly: `_base`, `is_view` and the shared version counter as there) where the layers above it add nothing (no
grad to record, no forward grad, no thread-local dispatch key, no view replay); through the dispatcher for any other
tensor)
or a number the verdict keys by type (a `Scalar`, `float` or `int`, say an optimizer's step size: read from the
record and converted as `toIValue` converts the Python number the full decode gives; also a `Scalar[]` of them, the
step sizes of a `_foreach_div_` or `_foreach_addcdiv_`); the other arguments are
converted to IValues once, with the same conversion torch's Python binding uses (`torch::jit::toIValue` on the
schema's type). The op returns one Tensor (bound as above), nothing (an in-place `_foreach_` op: its output handle
stays unbound, as `_bind_outputs` leaves it), or several tensors (a tuple, say `native_layer_norm`'s, or a Tensor[],
`_foreach_sqrt`'s): each output handle is checked as `_run_step` checks them (none live, the handle limit counted
for all of them) and the values are bound by the executor's own `_bind_outputs`. Steps with argument kinds the
runner does not know (a `float[]` or `int[]` keyed by type, other returns) stay in Python.

A random op (`OpPlan.seeded`: dropout, `rand_like`, `bernoulli`, ...) runs here only in a session's own worker
process (`CommandExecutor.exclusive_rng`, the context's `rng`): as `CommandExecutor._seeded` does there, per record,
the device's generator lock taken (without waiting: a lock held elsewhere leaves the record to the Python path,
which waits for it), the generator found to hold this session's stream (`executor._RNG_OWNER`), the op called, the
lock released: the same draws in the same order as the Python path. A generator that holds no stream or another
session's (the session's first random op, a new seed, another session drew last) leaves the record to the Python
path, which loads the session's state into it; where sessions share the process (`--isolation thread`, states
swapped per op) every random record is Python's.

The extension is built with `torch.utils.cpp_extension.load` (g++ and ninja, ~1 min once, cached under
`$GPUPOOL_NATIVE_RUNNER_CACHE`, default `$XDG_CACHE_HOME/gpupool/runner` or `~/.cache/gpupool/runner`, a folder per
torch version and source hash) by the first `load()`: the zygote does it before it forks any worker
(`CommandExecutor` calls `load()`; a worker process never builds: `forbid_build`, and its
sandbox denies exec anyway). `GPUPOOL_NATIVE_RUNNER=0` keeps every record on the Python path; without a
compiler or ninja, or when the build fails or overruns `build_timeout()` ($GPUPOOL_NATIVE_RUNNER_BUILD_TIMEOUT, 900 s;
killed then, its compiler too), one log line says so and the Python path runs. A zygote that builds tells its daemon
first (server/zygote.py `_build_runner`), which waits for the build beyond its bound on the zygote's start. One process
builds into a cache folder at a time (its build lock, `buildcache.exclusive`); the others wait and load that build.
The build's process dies with the zygote (a daemon killed mid-build), its compilers too (`buildcache.run_build`).
While it compiles, a log line every 15 s says how long so far, the CPU used against BUILD_CPU and what the compiler is
on (`buildcache.progress_line`, INFO: the daemon's log through its zygote's); a failed build's warning is the
compiler's first error line (`buildcache.failure_line`).

`GPUPOOL_NATIVE_RUNNER_SANITIZE=1` builds it with AddressSanitizer and UBSan instead (its own cache folder,
`asan/` under the cache), for tests in a Python started with the ASan runtime preloaded (`scripts/runner_asan.sh`,
docs/operations.md); without that runtime in the process it stays off (the Python path runs). Not for a daemon:
ASan's shadow memory is terabytes of private mappings, which a worker's RLIMIT_DATA (server/sandbox.py) refuses.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from gpupool import buildcache, config

from . import attention, fallbacks, guards
from .runner_source import DIGEST_ENV, SOURCE, source, told_digest  # noqa: F401 - DIGEST_ENV: tests name it here
from .templates import C_ARG, C_KW, L_ARG, L_KW, LV_ARG, LV_KW, N_ARG, N_KW, NL_ARG, NL_KW, T_ARG, T_KW, V_ARG, V_KW

log = logging.getLogger(__name__)

EXTERNAL, NONE = -1, -2  # runs.EXTERNAL, runs.NONE
END, OVER = 1, 2  # flags of `Ctx.run`
_state: list[Any] = []  # [the module, or None when unavailable] once `load` decided
_no_build: list[bool] = []
_KINDS = frozenset({T_ARG, T_KW, L_ARG, L_KW, C_ARG, C_KW, N_ARG, N_KW, V_ARG, V_KW, LV_ARG, LV_KW, NL_ARG, NL_KW})
INT, INT_AS_DOUBLE, DOUBLE = 4, 5, 6  # how the C++ runner reads a number field (native_runner.cpp, `Kind`)
INTS, DOUBLES = 7, 8  # a Scalar[] of ints or floats (`ListKind`)
NOTHING, ONE, SEVERAL = 0, 1, 2  # what a step's op returns (`Returns`)
# How long a build may take, waiting for another process's build of the same source included, before it is given up
# (the build killed, the Python path run): $GPUPOOL_NATIVE_RUNNER_BUILD_TIMEOUT seconds, default BUILD_TIMEOUT. It
# took 1-3 min on a loaded 2-core box; a daemon waits for it at its first start beside its own bound on the zygote's
# imports (server/zygote.py START_TIMEOUT), which a build no longer counts against.
BUILD_TIMEOUT_ENV, BUILD_TIMEOUT = "GPUPOOL_NATIVE_RUNNER_BUILD_TIMEOUT", 900.0
# CPU seconds a build takes on an idle core, about (the compiler's, and torch.utils.cpp_extension's import): what the
# estimate a build starts with scales by the load per core (`buildcache.estimate`: 275 s at load ~15 on 2 cores in
# round 48, 4.8 min at load 12), and what its progress lines count against. Until round 49 the daemon said "~60 s".
BUILD_CPU = 45.0
# Test-only (tests/integration/test_first_start.py): a build lasts at least this many seconds, as on a slow host. Never
# set it on a real host.
SLOW_BUILD_ENV = "GPUPOOL_TEST_RUNNER_BUILD_SECONDS"


def enabled() -> bool:
    """False when `GPUPOOL_NATIVE_RUNNER=0` asks for the Python path."""
    return os.environ.get("GPUPOOL_NATIVE_RUNNER", "1").strip() != "0"


def sanitized() -> bool:
    """`GPUPOOL_NATIVE_RUNNER_SANITIZE=1`: build (and load) the runner with AddressSanitizer and
    UndefinedBehaviorSanitizer, in a cache folder of its own. Only for a Python started with the ASan runtime
    preloaded (docs/operations.md "The native runner under sanitizers", scripts/runner_asan.sh): never a daemon."""
    return os.environ.get("GPUPOOL_NATIVE_RUNNER_SANITIZE", "0").strip() not in ("", "0")


_SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]


def cache_dir() -> Path:
    base = config.cache_dir("runner", "GPUPOOL_NATIVE_RUNNER_CACHE")
    return base / "asan" if sanitized() else base


def forbid_build() -> None:
    """In a worker process: `load` only uses a module the zygote loaded before the fork, never builds one."""
    _no_build.append(True)


def missing() -> str | None:
    """Why the runner cannot be built here, or None."""
    if sys.byteorder != "little":
        return "a big-endian host (records are little-endian)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')} not on PATH)"
    if shutil.which("ninja") is None:
        return "no ninja (torch.utils.cpp_extension needs it)"
    return None


def load() -> Any:
    """The extension module (built at the first call in this process tree), or None: disabled or unavailable."""
    if not enabled():
        return None
    if _state:
        return _state[0]
    if _no_build:
        log.info("native runner: not loaded before this worker forked; learned runs stay in Python")
        _state.append(None)
        return None
    why = missing() or _no_asan()
    mod = None
    if why is not None:
        log.info("native runner unavailable (%s): learned runs stay in Python", why)
    else:
        try:
            mod = _import(_built())
        except Exception as exc:  # a failed build costs speed, never the daemon
            log.warning("native runner: no build loaded (%s): learned runs stay in Python, as with "
                        "GPUPOOL_NATIVE_RUNNER=0 (slower eager steps, the same results)", str(exc)[:300])  # fmt: skip
            mod = None
    _state.append(mod)
    return mod


_NAME = "gpupool_native_runner"


def _final() -> Path:
    """Where the build of this source for this torch lives (a folder per torch version and source hash): in a zygote,
    the source its daemon read (DIGEST_ENV). Round 25 hashed the file at each call, so a checkout changed under a
    running daemon gave the front (which looks for the build at its first frame) the build of another source than
    the zygote's (which built at its start). A told digest that is not 16 hex digits raises ValueError (`told_digest`:
    it names a folder)."""
    digest = told_digest() or source()[1]
    return cache_dir() / f"torch-{torch.__version__}-{digest}" / f"{_NAME}.so"


def decided() -> bool:
    """Whether `built` has its last answer in this process: disabled or unavailable (`load`'s reasons), or a module or
    None that `load` or `built` settled on."""
    return bool(_state) or not enabled() or bool(_no_build) or (missing() or _no_asan()) is not None


def built() -> Any:
    """The extension module where it is at hand without a build, for the daemon's front (`slices.split_frame`): what
    this process's `load` gave, else the cached build of this source, imported here (and kept as `load`'s answer)
    but never built (the zygote builds it at its start, before it forks any worker). None while no build is
    there (the caller may ask again later: `decided`), and when disabled or unavailable."""
    if _state:
        return _state[0]
    if not enabled() or _no_build or missing() or _no_asan():
        return None
    try:
        final = _final()
        if not final.exists():
            return None
        mod = _import(final)
    except Exception as exc:  # an unsafe cache folder, a build that does not load: speed lost, never the daemon
        log.warning("native runner: no cached build loaded (%s): the front cuts frames in Python", str(exc)[:300])
        mod = None
    _state.append(mod)
    return mod


def build_timeout() -> float:
    """How long a build may take ($GPUPOOL_NATIVE_RUNNER_BUILD_TIMEOUT seconds, default BUILD_TIMEOUT); a value that
    is not a positive number raises ValueError naming the variable."""
    raw = os.environ.get(BUILD_TIMEOUT_ENV, "").strip()
    if not raw:
        return BUILD_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{BUILD_TIMEOUT_ENV}={raw[:40]!r} is not a positive number of seconds")
    return value


def needs_build() -> bool:
    """Whether `load` would build the extension (enabled, buildable here, nothing decided yet and no cached build of
    this source): what a zygote tells its daemon before it does (server/zygote.py), so that the daemon waits for it."""
    if _state or not enabled() or _no_build or missing() or _no_asan():
        return False
    try:
        return not _final().exists()
    except Exception:  # an unsafe cache folder, a bad digest: `load` says why, and builds nothing
        return False


def _built() -> Path:
    """The extension for this torch and this source, built once per cache (a folder per torch version and source
    hash, so checkouts of other sources never replace each other's build). One process builds at a time: a builder
    holds the folder's build lock (`buildcache.exclusive`, a `flock` the kernel drops with its holder, so a build
    killed midway never hangs a later start, as cpp_extension's own lock file did), and a process that waited for
    it uses the build it made. The build runs in a private folder and its result is moved into place (`os.replace`,
    atomic); the folder of a build killed midway is removed by the next build or load (gpupool/buildcache.py). The
    wait and the build together take at most `build_timeout()`: past it the build (its compiler included) is killed
    and RuntimeError says so."""
    final = _final()
    if final.exists():
        buildcache.sweep(final.parent)  # the folders of builds killed midway (gpupool/buildcache.py)
        return final
    data, digest = source()
    if not final.parent.name.endswith(f"-{digest}"):  # a zygote whose daemon read another source: no build of it
        raise RuntimeError(f"{SOURCE} changed since the daemon read it ({digest}, not {final.parent.name})")
    bound = build_timeout()
    deadline = time.monotonic() + bound
    late = f"the native runner's build did not finish within {bound:.0f} s ({BUILD_TIMEOUT_ENV})"
    with buildcache.exclusive(final.parent, deadline, late):
        if final.exists():  # another process built it while this one waited
            return final
        _build(final, data, deadline, late)
    return final


def _build(final: Path, data: bytes, deadline: float, late: str) -> None:
    """Build `data` (the source) into `final` by `deadline`, in a session of its own (`buildcache.run_build`):
    killed whole (ninja and its compilers too) when the deadline passes or the zygote dies."""
    with buildcache.private_build_dir(final.parent) as tmp:
        # the sanitized build keeps torch's and pybind11's debug checks (native_runner.cpp: NDEBUG otherwise)
        checked = ["-O1", "-g", "-DGPUPOOL_RUNNER_CHECKED", *_SANITIZE]
        cflags, ldflags = (checked, _SANITIZE) if sanitized() else (["-O2"], [])
        copy = tmp / SOURCE.name  # the bytes hashed, not the file as it is by the compiler's read
        copy.write_bytes(data)
        spec = {"name": _NAME, "sources": [str(copy)], "extra_cflags": cflags, "extra_ldflags": ldflags,
                "build_directory": str(tmp), "is_python_module": False, "verbose": False}  # fmt: skip
        # In a process of its own: torch.utils.cpp_extension's import asks the CUDA runtime for a device count on a
        # CUDA host, which would poison every fork of the zygote (the caller), and leaves threads behind in it. It
        # dies with the zygote, its compilers too (`buildcache.run_build`).
        at_least = float(os.environ.get(SLOW_BUILD_ENV) or 0)
        code, out = buildcache.run_build(spec, deadline, late, at_least, progress=_progress, what="the native runner",
                                         cpu=BUILD_CPU)  # fmt: skip
        if code != 0:  # one line: the compiler's first error (its whole output at DEBUG)
            log.debug("the native runner's build output:\n%s", out[-20000:])
            raise RuntimeError(f"the native runner's build failed: {buildcache.failure_line(out, code)}")
        os.replace(tmp / f"{_NAME}.so", final)


def _progress(line: str) -> None:
    log.info("%s", line)


def _no_asan() -> str | None:
    """Why a sanitized runner cannot load in this process, or None: ASan's runtime must have been loaded first (a
    sanitized extension dlopened without it ends the process)."""
    if not sanitized():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    if "libasan" not in maps:
        return "GPUPOOL_NATIVE_RUNNER_SANITIZE=1 without the ASan runtime preloaded (see scripts/runner_asan.sh)"
    return None


def _import(path: Path) -> Any:
    """The cached build at `path`, imported: only where no other user could have written it (its folder and the file
    itself, `config.import_private_extension`: the file checked is the file loaded; the cache's root alone is checked
    by `cache_dir`); else UnsafeCacheDir."""
    return config.import_private_extension(_NAME, path)


def compile_trace(mod: Any, trace: Any, dev: torch.device) -> Any:
    """The native form of `trace` (a `runs.Trace` of a session on `dev`): a plan per step that qualifies; None when
    none does."""
    plans = [_plan(mod, step, dev) for step in trace.steps]
    if not any(p is not None for p in plans):
        return None
    # weakly: the trace holds its native form (`Trace.native`), which reads its `next` when its records run on
    # (`Ctx.run`'s chaining)
    return mod.Trace(plans, weakref.ref(trace))


def _plan(mod: Any, step: Any, dev: torch.device) -> Any:
    try:
        return _compile(mod, step, dev)
    except Exception as exc:  # a step the runner cannot express stays in Python
        log.debug("native runner: step %s stays in Python: %s", getattr(step.plan, "name", "?"), exc)
        return None


def refusal(mod: Any, step: Any, dev: torch.device) -> str | None:
    """Why `step` stays in Python, in a word (bench/run_census.py): the first of its per-op extras the runner does
    not do (`_extras`), or "other" for a step it cannot express otherwise; None where it compiles."""
    return _extras(step) or (None if _plan(mod, step, dev) is not None else "other")


def _extras(step: Any) -> str | None:
    """The first per-op extra of `_run_step` that keeps `step` in Python, or None."""
    plan = step.plan
    if plan.reshapes:
        return "reshapes"
    return "check" if step.check and _guard(step) is None else None


def _guard(step: Any) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]] | None:
    """A value-guarded step's guard as the runner checks it per record, (ranges, device pairs), None where it cannot:
    value ranges of its tensor arguments (`guards.index_ranges`), or, where the guard reads nothing else the step
    does not fix, the devices of pairs of its tensor arguments (`guards.fixed_guard`)."""
    name, args, kwargs = step.plan.name, step.tpl.args, step.tpl.kwargs
    ranges = guards.index_ranges(name, args, kwargs)
    if ranges is not None:
        return ranges, []
    devices = guards.fixed_guard(name, args, kwargs)
    return None if devices is None else ([], devices)


def _compile(mod: Any, step: Any, dev: torch.device) -> Any:
    tpl, plan = step.tpl, step.plan
    op = plan.op
    # `Step.fast`, a factory of the session's device (`_run_step` gives it the device when the record has none), or
    # an op returning several tensors (a tuple, or a Tensor[]) that `_run_step` binds with `_bind_outputs`
    n_out = tpl.n_out
    if _extras(step) is not None:
        return None
    if op.__class__ is not torch._ops.OpOverload:
        return None
    # a fake GPU's faster composition of the op (server/fallbacks.py FASTER, the same bits: native_dropout and its
    # backward) is called here as the Python path calls it; any other run that is not the op stays in Python
    # the fused attention's compositions (server/attention.py `REPLACEMENTS`: no kernel of the overrideable backend on
    # the daemon's devices) are called the same way
    name = op._schema.name
    faster = name in fallbacks.FASTER and plan.run is fallbacks.lookup(op, dev)
    # and so is a conv's, which lays its outputs out as the clients' meta kernels do (guards.META_LAYOUT)
    kept = plan.run is attention.REPLACEMENTS.get(name) or plan.run is guards.META_LAYOUT.get(name)
    py_run = plan.run is not op._op and (faster or kept)
    if any(kind not in _KINDS for kind, _, _, _ in tpl.steps):
        return None
    schema = op._schema
    rets = [r.type for r in schema.returns]
    if not rets:
        returns = NOTHING
    elif len(rets) == 1 and isinstance(rets[0], torch.TensorType):
        returns = ONE
    elif all(isinstance(t, torch.TensorType) for t in rets) or (len(rets) == 1 and _tensors(rets[0])):
        returns = SEVERAL
    elif py_run and len(rets) > 1:  # the attention forward's tuple also holds ints: bound as `_bind_outputs` binds
        returns = SEVERAL
    else:
        return None
    # `_bind_outputs` refuses more handles than values (the Python path's); an op that returns nothing may come
    # without an output handle (a `_foreach_` op in place: the C++ client's records name none), binding nothing
    if plan.uninitialized and returns != ONE:  # the runner zeroes one output's storage (`Plan::zero`)
        return None
    if (returns == ONE and n_out != 1) or (returns == SEVERAL and n_out < 1) or (returns == NOTHING and n_out > 1):
        return None
    offsets, fixed, codes = _layout(tpl)
    if offsets is None:
        return None
    # where each record puts its own tensors: argument index or keyword -> ("t", ...) / ("l", ...)
    placed: dict[tuple[bool, Any], tuple[Any, ...]] = {}
    for kind, i, where, n, src, meta, _ in step.ins:
        if kind == T_ARG or kind == T_KW:
            placed[(kind == T_KW, where)] = ("t", offsets[i], src, meta, None)
        elif kind == V_ARG or kind == V_KW:  # a view argument: its tensor as above, and the geometry to apply
            # n: the compact.Geometry (read and checked on its own when the template was made)
            placed[(kind == V_KW, where)] = ("t", offsets[i], src, meta, _geometry(n))
        elif kind == L_ARG or kind == L_KW:
            elems: list[tuple[Any, ...]] = [(offsets[i + j], src[j], meta[j]) for j in range(n)]
            placed[(kind == L_KW, where)] = ("l", elems)
        elif kind == LV_ARG or kind == LV_KW:  # a tensor list with views (compact.VIEWS): per element as above
            elems = [(offsets[f], src[j], meta[j], None if g is None else _geometry(g)) for j, (f, g) in enumerate(n)]
            placed[(kind == LV_KW, where)] = ("l", elems)
        elif kind == N_ARG or kind == N_KW:
            placed[(kind == N_KW, where)] = ("n", offsets[i], codes[i] == "d")
        elif kind == NL_ARG or kind == NL_KW:  # numbers of one code (a FLOATS or an INTS list)
            placed[(kind == NL_KW, where)] = ("s", offsets[i : i + n], codes[i] == "d" if n else None)
    args, kwargs = tpl.args, tpl.kwargs
    if plan.takes_device and kwargs.get("device") is None:
        kwargs = {**kwargs, "device": dev}
    params = schema.arguments
    if len(args) > len(params) or any(p.kwarg_only for p in params[: len(args)]):
        return None
    names = {p.name for p in params}
    if any(k not in names for k in kwargs):
        return None
    out: list[tuple[Any, ...]] = []
    for a, p in enumerate(params):
        if a < len(args):
            key: tuple[bool, Any] = (False, a)
            value = args[a]
        elif p.name in kwargs:
            key = (True, p.name)
            value = kwargs[p.name]
        elif p.has_default_value():
            out.append(("d",))
            continue
        else:
            return None
        got = placed.pop(key, None)
        if got is None:
            if isinstance(value, torch.Tensor):  # a tensor in a template's constants: never (templates hold none)
                return None
            out.append(("c", value))
        elif got[0] == "n":
            number = _number(p.type, got[2])
            if number is None:
                return None
            out.append(("n", got[1], number))
        elif got[0] == "s":
            t = p.type
            if not (isinstance(t, torch.ListType) and isinstance(t.getElementType(), torch.NumberType)):
                return None  # a float[] or int[] keyed by type: Python's (a Scalar[] is an optimizer's step sizes)
            out.append(("s", DOUBLES if got[2] else INTS, got[1]))
        elif got[0] == "t":
            t = p.type
            if not (isinstance(t, torch.TensorType) or (isinstance(t, torch.OptionalType) and _tensor(t))):
                return None
            out.append(got)
        else:
            t = p.type
            if not isinstance(t, torch.ListType):
                return None
            elem = t.getElementType()
            optional = isinstance(elem, torch.OptionalType)
            if not (isinstance(elem, torch.TensorType) or (optional and _tensor(elem))):
                return None
            if not optional and any(e[1] == NONE for e in got[1]):
                return None
            out.append(("l", optional, got[1]))
    if placed:  # a tensor the schema has no place for
        return None
    guard = _guard(step) if step.check else ([], [])
    if guard is None:
        return None
    ranges, devices = guard
    if any(out[a][0] != "t" for a, _, _ in ranges) or any(out[a][0] != "t" or out[b][0] != "t" for a, b in devices):
        return None
    if py_run and any(a[0] in ("l", "s") for a in out):
        return None  # lists: the runner passes a Python run numbers, constants and single tensors only
    name, overload = schema.name, schema.overload_name
    outs = offsets[1 : 1 + n_out]
    run = plan.run if py_run else op._op
    below = not py_run and below_autograd(f"{name}.{overload}" if overload else name, dev)
    compiled = mod.plan(name, overload, tpl.size, fixed, outs, out, step.need, list(step.keep), plan, run, returns,
                        plan.seeded, len(args) if py_run else -1, plan.uninitialized, ranges, devices,
                        below)  # fmt: skip
    # the fused attention's eager dropout calls and a fake GPU's dropout run in C++ (native_runner.cpp `attn::run`,
    # `dropout::run`: the same aten ops as the Python run's, which takes every other call: its rules and errors)
    which = _IN_CPP.get(name) if py_run and (faster or run is attention.REPLACEMENTS.get(name)) else None
    if which is not None:
        mod.in_cpp(compiled, which)
    return compiled


# `Plan::in_cpp`
_IN_CPP = {attention.FORWARD: 1, attention.BACKWARD: 2, "aten::native_dropout": 3, "aten::native_dropout_backward": 4}


_BACKEND_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def below_autograd(qualified: str, dev: torch.device) -> bool:
    """Whether the runner may call op `qualified` below the autograd keys (`Plan::below_autograd`): its session's
    device is a CPU (a fake GPU) or a CUDA device, and both that device's dispatch key and the CPU's (a record's
    tensors may all be CPU ones: Adam's step counts) have a kernel for it, of their own or a composite one -- what
    the op's Autograd kernel would redispatch to, the worker's grad mode being off."""
    key = _BACKEND_KEYS.get(dev.type)
    if key is None:
        return False
    has = torch._C._dispatch_has_computed_kernel_for_dispatch_key
    return bool(has(qualified, key) and has(qualified, "CPU"))


def _geometry(g: Any) -> tuple[Any, ...]:
    """A `compact.Geometry` as the C++ runner takes it: (sizes, strides, offset, last)."""
    return (g.sizes, g.strides, g.offset, g.last)


def _number(t: Any, is_float: bool) -> int | None:
    """How the runner converts a number field for an argument of type `t`, as `toIValue` converts the Python
    number the full decode gives: a Scalar keeps an int an int and a float a float, a float takes either, an int
    only an int; None for any other type (the step stays in Python)."""
    if isinstance(t, torch.OptionalType):
        t = t.getElementType()
    if isinstance(t, torch.NumberType):
        return DOUBLE if is_float else INT
    if isinstance(t, torch.FloatType):
        return DOUBLE if is_float else INT_AS_DOUBLE
    if t.__class__ is torch.IntType and not is_float:
        return INT
    return None


def _tensor(t: Any) -> bool:
    return isinstance(t.getElementType(), torch.TensorType)


def _tensors(t: Any) -> bool:
    """A `Tensor[]`."""
    return isinstance(t, torch.ListType) and isinstance(t.getElementType(), torch.TensorType)


def _layout(tpl: Any) -> tuple[list[int] | None, list[tuple[int, bytes]], list[str]]:
    """Each field's byte offset in the record, the fixed segments (offset, bytes) and each field's struct code; None
    for a format the runner does not read (anything but byte runs, handles and 64-bit numbers)."""
    fmt = tpl.unpack.__self__.format
    if not fmt.startswith("<") or struct.calcsize(fmt) != tpl.size:
        return None, [], []
    fixed_values = tpl.fixed if isinstance(tpl.fixed, tuple) else (tpl.fixed,)
    offsets: list[int] = []
    codes: list[str] = []
    runs: list[tuple[int, int]] = []
    pos = 0
    for count, code in _tokens(fmt[1:]):
        if code == "s":
            offsets.append(pos)
            codes.append(code)
            runs.append((pos, count))
            pos += count
        elif code in "Qqd":
            for _ in range(count):
                offsets.append(pos)
                codes.append(code)
                pos += 8
        else:
            return None, [], []
    if pos != tpl.size or len(runs) != len(fixed_values):
        return None, [], []
    segs = [(at, bytes(v)) for (at, count), v in zip(runs, fixed_values, strict=True)]
    if any(len(v) != count for (_, v), (_, count) in zip(segs, runs, strict=True)):
        return None, [], []
    return offsets, segs, codes


def _tokens(fmt: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    num = ""
    for ch in fmt:
        if ch.isdigit():
            num += ch
        else:
            out.append((int(num) if num else 1, ch))
            num = ""
    return out
