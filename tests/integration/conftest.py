"""Pools and a daemon shared by the integration modules: `gpupool up` pools (used through `gpupool run` or the client
library) and the shim tests' `gpupool serve` (`serve`, `attach`, `dev`).

Each pool is started once per test session and stopped at its end (coming up took 10-40 s, once per module before
round 19). The modules use it by turns, never at once: the module-scoped fixtures below wait for the pool to hold no
lease before a module's first test and after its last (`examples_fixtures.idle_pool`), so each module starts on an
idle pool, as it did on a fresh one. These fixtures are found by pytest, not imported by name: a fixture imported
into several modules would be set up once per module.

The shim tests' `gpupool serve` is likewise started once per session (once per module, ten starts, before round
20). Its tests never need a fresh daemon: each attaches sessions of its own (a fresh lease and session per token,
detached after the test, which frees what they held), the daemon's isolation of sessions being what they rely on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # (imported where used: pytest-xdist's controller loads this module too, tests/conftest.py)
    import torch
    from shim_fixtures import Attach, ServeProcess
    from support import Healthy


@pytest.fixture(scope="session")
def _two_gpu_pool_exports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The two-GPU pool's client environment, as its `gpupool up` prints it (test_journey52: its credentials)."""
    from examples_fixtures import gpupool_up

    with gpupool_up(tmp_path_factory.mktemp("up2"), "--fake-gpus", "2", "--fake-gpu-memory", "512MiB") as env:
        yield env


@pytest.fixture(scope="session")
def _two_gpu_pool(_two_gpu_pool_exports: dict[str, str]) -> str:
    return _two_gpu_pool_exports["GPUPOOL_SCHEDULER"]


@pytest.fixture(scope="module")
def two_gpu_pool(_two_gpu_pool: str) -> Iterator[str]:
    """`gpupool up` with two fake GPUs of 512 MiB (the scheduler's address), idle at the module's start and end:
    test_cuda_scripts, test_shim_lease, the C++ client's test_native_client_*, test_journey52 (its credentials). A lease
    of one device there is what a one-GPU pool gives (the lease's count, its fraction of 512 MiB)."""
    from examples_fixtures import idle_pool

    yield idle_pool(_two_gpu_pool)
    idle_pool(_two_gpu_pool)


@pytest.fixture(scope="session")
def _example_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from examples_fixtures import gpupool_up

    with gpupool_up(tmp_path_factory.mktemp("pool"), "--fake-gpus", "1") as env:
        yield env


@pytest.fixture(scope="module")
def pool_env(_example_pool: dict[str, str]) -> Iterator[dict[str, str]]:
    """`gpupool up` with one fake GPU (8 GiB, the default) for the example tests, idle at the module's start and end;
    yields the client environment that `gpupool up` prints."""
    from examples_fixtures import idle_pool

    idle_pool(_example_pool["GPUPOOL_SCHEDULER"])
    yield _example_pool
    idle_pool(_example_pool["GPUPOOL_SCHEDULER"])


@pytest.fixture(scope="session")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`gpupool serve --fake-gpus 2 --fake-gpu-memory 2GiB` for the session: the shim tests (gpupool:0 unless they
    ask for device 1), the C++ client's daemon tests, test_multi_device (both devices)."""
    from shim_fixtures import start_daemon
    from support import stop_process

    daemon = start_daemon(tmp_path_factory.mktemp("shim"), "2GiB", 2)
    yield daemon
    stop_process(daemon.process)


@pytest.fixture
def attach(serve: ServeProcess) -> Iterator[Attach]:
    """`attach(quota_bytes=0, share=1.0)` -> a gpupool device on the shared daemon (a fresh lease and session)."""
    import gpupool.torch as gt

    def do(**claims: Any) -> torch.device:
        return gt.attach(serve.address, serve.token(**claims))

    yield do
    gt.detach_all()


@pytest.fixture
def dev(attach: Attach) -> torch.device:
    return attach()


@pytest.fixture
def healthy(daemon: Any) -> Iterator[Healthy]:
    """A neighbour session on the test's in-process `daemon` (tenant "healthy") that computes and checks exact
    results in a thread the whole test; its check after the test fails the test if one of its results was wrong or
    refused (test_daemon_bad_input.py, test_daemon_compact.py, test_daemon_graph.py: a hostile session's failure never
    touches another)."""
    from support import Healthy

    h = Healthy(daemon.address, daemon.token(tenant="healthy"))
    yield h
    h.check()


@pytest.fixture
def fused_on() -> Iterator[Any]:
    """`set(on)`: the native guard's switch of SDPA's fused backend (GPUPOOL_FUSED_SDPA), on to begin with
    (test_attention.py, test_attention_dropout.py)."""
    from gpupool.client.torch import native

    before = native.set_fused_attention(True)
    if not before and not native.set_fused_attention(True):
        pytest.skip("no native guard: SDPA always takes the math path")
    yield native.set_fused_attention
    native.set_fused_attention(before)
