"""The native runner is built as libtorch itself is, with NDEBUG (round 47, server/native_runner.cpp's head).

Without it torch's headers compile their debug-only code into every dispatcher call the runner makes (a dispatch-trace
guard and `c10::show_dispatch_trace()`), and pybind11 checks the GIL (`PyGILState_Check`) on every reference count a
`py::handle` changes: ~1.5k instructions an op on the encoder's worker, and a RecordFunction laid out otherwise than
in the library that runs it. The built library's dynamic symbols say which: each of those calls imports its symbol."""

from __future__ import annotations

from typing import Any

import pytest


def test_the_runner_is_built_without_debug_checks(native_runner_module: Any) -> None:
    from gpupool.server import native_runner

    if native_runner.sanitized():  # the sanitized build keeps them (GPUPOOL_RUNNER_CHECKED)
        pytest.skip("a sanitized runner keeps torch's and pybind11's debug checks")
    lib = native_runner._final().read_bytes()  # the library the fixture loaded (its cache entry, by source digest)
    assert b"PyObject_GetAttr\x00" in lib  # (the dynamic string table is read at all: a symbol every build imports)
    assert b"\x00PyGILState_Check\x00" not in lib, "pybind11's GIL check on every handle's refcount is compiled in"
    assert b"show_dispatch_trace" not in lib, "the dispatcher's debug trace is compiled into its calls"
