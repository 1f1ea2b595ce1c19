"""A new user's first errors (journey of round 52): a client command with no pool running, or with a pool but not
its credentials (none, the CA alone, another pool's CA, another pool's certificate), fails in one line that says
what is wrong and what to set. Until round 52 each was gRPC's words ("failed to connect to all addresses; last
error: UNAVAILABLE: ipv4:...: Socket closed", with no hint where a CA was set; "Connection refused" with a TLS hint
where no pool ran), and a failed TLS handshake printed a line of gRPC's core first ("I1207 ... Handshake failed")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from scheduler_fixtures import ROOT

from gpupool import pki

pytestmark = pytest.mark.slow


def smi(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`gpupool smi` with `env` for its GPUPOOL_* (none of the test's own)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "GRPC_")) and k != "COLUMNS"}
    return subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "smi", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**base, "PYTHONPATH": str(ROOT), **env},
    )  # fmt: skip


def test_a_client_of_no_pool_is_told_to_start_one(closed_port: int) -> None:
    done = smi({"GPUPOOL_SCHEDULER": f"127.0.0.1:{closed_port}"})
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert done.stderr == (
        f"gpupool smi: scheduler 127.0.0.1:{closed_port} unreachable: nothing listens there: no pool runs there "
        "(`gpupool up` starts one), or it is elsewhere (GPUPOOL_SCHEDULER, as `gpupool up` prints)\n"
    )


@pytest.fixture(scope="module")
def pool(two_gpu_pool: str, _two_gpu_pool_exports: dict[str, str]) -> dict[str, str]:
    """The session's two-GPU `gpupool up` (tests/integration/conftest.py, idle at the module's start and end): the
    exports its banner prints. (`up --detach --state DIR`, which this module's own pool checked until round 53, is
    test_up_log52's detached pool.)"""
    assert _two_gpu_pool_exports["GPUPOOL_SCHEDULER"] == two_gpu_pool
    return _two_gpu_pool_exports


@pytest.mark.parametrize(
    ("credentials", "words"),
    [
        ("none", "its certificate is of a CA this client does not know: set GPUPOOL_TLS_CA to the pool's CA, and "
                 "GPUPOOL_TLS_CERT/_KEY, as `gpupool up` prints"),
        ("the CA alone", "it closed the TLS connection: it admits clients with a certificate of its CA only: set "
                         "GPUPOOL_TLS_CERT and GPUPOOL_TLS_KEY, as `gpupool up` prints"),
        ("another pool's CA", "its certificate is not of the CA in {other}/ca.crt (GPUPOOL_TLS_CA: another pool's?): "
                              "set this pool's, as `gpupool up` prints"),
        ("another pool's certificate", "it closed the TLS connection: it did not take the client certificate "
                                       "{other}/tenant-me.crt (GPUPOOL_TLS_CERT: another pool's?): set this pool's, "
                                       "as `gpupool up` prints"),
    ],
)  # fmt: skip
def test_a_client_without_the_pools_credentials_is_told_which_to_set(
    pool: dict[str, str], tmp_path: Path, credentials: str, words: str
) -> None:
    exports = pool
    address = exports["GPUPOOL_SCHEDULER"]
    other = tmp_path / "other"
    ca = pki.LocalCA(other)
    theirs = ca.issue("tenant", "me", other / "tenant-me")
    env = {"GPUPOOL_SCHEDULER": address}
    if credentials != "none":
        env["GPUPOOL_TLS_CA"] = str(ca.cert_path) if credentials == "another pool's CA" else exports["GPUPOOL_TLS_CA"]
    if credentials == "another pool's CA":
        env.update(GPUPOOL_TLS_CERT=exports["GPUPOOL_TLS_CERT"], GPUPOOL_TLS_KEY=exports["GPUPOOL_TLS_KEY"])
    if credentials == "another pool's certificate":
        env.update(GPUPOOL_TLS_CERT=str(theirs.cert), GPUPOOL_TLS_KEY=str(theirs.key))
    done = smi(env)
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert done.stderr == f"gpupool smi: scheduler {address} unreachable: {words.format(other=other)}\n"
    # (and the pool's own credentials work)
    ok = smi(exports)
    assert ok.returncode == 0, ok.stderr
    # whole into a pipe: until round 53 rich cut it at 80 columns ("alloc…", "capaci…", the model in four lines)
    header = next(line for line in ok.stdout.splitlines() if " host " in line)
    assert "memory used" in header and "allocated" in header and "capacity" in header, ok.stdout
    assert "gpupool fake GPU (CPU)" in ok.stdout and "…" not in ok.stdout, ok.stdout
