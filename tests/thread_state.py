"""The check that no test leaves the thread running the tests changed (registered by tests/conftest.py's
`pytest_plugins`): its torch state before each test's setup and after its teardown (`ThreadState`: dispatch and
function modes, thread-local dispatch keys, grad, inference, forward-grad, view-replay and autocast modes, the default
dtype, the thread count) must be equal, else the test fails at its teardown with what changed, and what torch lets be
set is put back, so that only that test fails. Round 46's final CI failed a view-counting unit test in a worker whose
main thread an earlier test had left with a TorchDispatchMode-like dispatch state; this names the test that did it.
A plugin module of its own (not conftest.py) so that tests/unit/test_thread_state_check.py can run it in a pytest of
its own without the suite's session set-up.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch


class _Names(frozenset[str]):
    def __repr__(self) -> str:
        return "{" + ", ".join(sorted(self)) + "}"


def _key_names(keys: torch.DispatchKeySet) -> frozenset[str]:
    """The names in a DispatchKeySet (its repr, `DispatchKeySet(A, B)`: pybind offers no iteration)."""
    inner = repr(keys).partition("(")[2].rpartition(")")[0]
    return _Names(name.strip() for name in inner.split(",") if name.strip())


@dataclass(frozen=True)
class ThreadState:
    """The calling thread's torch state that a test could leave changed for the tests after it
    (`pytest_runtest_teardown` below compares it before and after each test): the Python dispatch and function mode
    stacks, the infra dispatch modes, the thread-local dispatch key sets, grad, inference, forward-grad, view-replay and
    autocast modes (thread-local), the default dtype and the thread count."""

    dispatch_modes: tuple[str, ...]
    function_modes: tuple[str, ...]
    infra_modes: tuple[str, ...]
    included: _Names
    excluded: _Names
    grad: bool
    inference: bool
    fwd_grad: bool
    view_replay: bool
    autocast: bool
    default_dtype: str
    threads: int

    THREAD_LOCAL = (
        "dispatch_modes",
        "function_modes",
        "infra_modes",
        "included",
        "excluded",
        "grad",
        "inference",
        "fwd_grad",
        "view_replay",
        "autocast",
    )

    @classmethod
    def now(cls) -> ThreadState:
        C: Any = torch._C
        keys = C._TorchDispatchModeKey
        return cls(
            dispatch_modes=tuple(
                type(C._get_dispatch_stack_at(i)).__qualname__ for i in range(C._len_torch_dispatch_stack())
            ),
            function_modes=tuple(
                type(C._get_function_stack_at(i)).__qualname__ for i in range(C._len_torch_function_stack())
            ),
            infra_modes=tuple(
                f"{key.name}={type(mode).__qualname__}"
                for key in (keys.FAKE, keys.PROXY, keys.FUNCTIONAL)
                if (mode := C._get_dispatch_mode(key)) is not None
            ),
            included=_key_names(C._dispatch_tls_local_include_set()),
            excluded=_key_names(C._dispatch_tls_local_exclude_set()),
            grad=torch.is_grad_enabled(),
            inference=torch.is_inference_mode_enabled(),
            fwd_grad=C._is_fwd_grad_enabled(),
            view_replay=C._is_view_replay_enabled(),
            autocast=C._is_any_autocast_enabled(),
            default_dtype=str(torch.get_default_dtype()),
            threads=torch.get_num_threads(),
        )

    @classmethod
    def in_fresh_thread(cls) -> ThreadState:
        """The state a new thread starts with (a daemon's worker thread's, `support.in_fresh_thread`'s)."""
        seen: list[ThreadState] = []
        th = threading.Thread(target=lambda: seen.append(cls.now()))
        th.start()
        th.join()
        return seen[0]

    def changes_from(self, before: ThreadState, thread_local_only: bool = False) -> str:
        """'' where equal, else `name: before -> now` for each field that differs."""
        names = self.THREAD_LOCAL if thread_local_only else [f.name for f in dataclasses.fields(self)]
        return "; ".join(
            f"{name}: {getattr(before, name)} -> {getattr(self, name)}"
            for name in names
            if getattr(before, name) != getattr(self, name)
        )

    def restore(self, now: ThreadState) -> list[str]:
        """Put the calling thread back to this state from `now` where torch lets it be set; the fields it could not
        put back."""
        from torch.overrides import _pop_mode as pop_function_mode
        from torch.utils._python_dispatch import _pop_mode as pop_dispatch_mode

        C: Any = torch._C
        while C._len_torch_dispatch_stack() > len(self.dispatch_modes):
            pop_dispatch_mode()
        while C._len_torch_function_stack() > len(self.function_modes):
            pop_function_mode()
        for name in now.included - self.included:
            C._dispatch_tls_set_dispatch_key_included(getattr(C.DispatchKey, name), False)
        for name in self.included - now.included:
            C._dispatch_tls_set_dispatch_key_included(getattr(C.DispatchKey, name), True)
        for name in now.excluded - self.excluded:
            C._dispatch_tls_set_dispatch_key_excluded(getattr(C.DispatchKey, name), False)
        for name in self.excluded - now.excluded:
            C._dispatch_tls_set_dispatch_key_excluded(getattr(C.DispatchKey, name), True)
        C._set_grad_enabled(self.grad)
        C._set_fwd_grad_enabled(self.fwd_grad)
        C._set_view_replay_enabled(self.view_replay)
        torch.set_default_dtype(getattr(torch, self.default_dtype.removeprefix("torch.")))
        torch.set_num_threads(self.threads)
        again = ThreadState.now()
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(again, f.name)]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """The thread state a test starts with (`ThreadState`), for `pytest_runtest_teardown` to compare; the
    first test of a process also checks it against a fresh thread's (an import at collection that changed it)."""
    before = ThreadState.now()
    item.stash[_STATE_BEFORE] = before
    if not item.session.stash.get(_STATE_CHECKED, False):
        item.session.stash[_STATE_CHECKED] = True
        fresh = ThreadState.in_fresh_thread()
        changed = before.changes_from(fresh, thread_local_only=True)
        if changed:
            raise AssertionError(f"this process's thread started its first test with a changed state: {changed}")
    return (yield)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Fail the test (an error at its teardown) that leaves the thread running the tests with another dispatch, grad,
    inference or autocast state, default dtype or thread count than it started with, after its fixtures' teardowns
    (a module's fixtures are torn down with its last test): a later test would run under it (round 46's final CI: a
    worker's main thread left with a TorchDispatchMode-like state by an earlier test, then a view-counting test
    failed). What can be put back is put back (`ThreadState.restore`), so only the test that changed it fails."""
    try:
        return (yield)
    finally:
        before = item.stash.get(_STATE_BEFORE, None)
        after = ThreadState.now()
        changed = None if before is None else after.changes_from(before)
        if changed:
            left = before.restore(after)
            raise AssertionError(
                f"{item.nodeid} left the thread running the tests changed: {changed}"
                + (f"; not put back: {', '.join(left)}" if left else "; put back")
            )


_STATE_BEFORE = pytest.StashKey["ThreadState"]()
_STATE_CHECKED = pytest.StashKey[bool]()
