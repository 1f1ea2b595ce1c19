"""Pools shared by the integration modules that use a `gpupool up` pool (through `gpupool run` or the client library).

Each pool is started once per test session and stopped at its end (coming up took 10-40 s, once per module before
round 19). The modules use it by turns, never at once: the module-scoped fixtures below wait for the pool to hold no
lease before a module's first test and after its last (`examples_fixtures.idle_pool`), so each module starts on an
idle pool, as it did on a fresh one. These fixtures are found by pytest, not imported by name: a fixture imported
into several modules would be set up once per module.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from examples_fixtures import gpupool_up, idle_pool


@pytest.fixture(scope="session")
def _two_gpu_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with gpupool_up(tmp_path_factory.mktemp("up2"), "--fake-gpus", "2", "--fake-gpu-memory", "512MiB") as env:
        yield env["GPUPOOL_SCHEDULER"]


@pytest.fixture(scope="module")
def two_gpu_pool(_two_gpu_pool: str) -> Iterator[str]:
    """`gpupool up` with two fake GPUs of 512 MiB (the scheduler's address), idle at the module's start and end:
    test_cuda_scripts, test_shim_lease and the C++ client's test_native_client_*. A lease of one device there is what
    a one-GPU pool gives (the lease's count, its fraction of 512 MiB)."""
    yield idle_pool(_two_gpu_pool)
    idle_pool(_two_gpu_pool)


@pytest.fixture(scope="session")
def _example_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with gpupool_up(tmp_path_factory.mktemp("pool"), "--fake-gpus", "1") as env:
        yield env


@pytest.fixture(scope="module")
def pool_env(_example_pool: dict[str, str]) -> Iterator[dict[str, str]]:
    """`gpupool up` with one fake GPU (8 GiB, the default) for the example tests, idle at the module's start and end;
    yields the client environment that `gpupool up` prints."""
    idle_pool(_example_pool["GPUPOOL_SCHEDULER"])
    yield _example_pool
    idle_pool(_example_pool["GPUPOOL_SCHEDULER"])
