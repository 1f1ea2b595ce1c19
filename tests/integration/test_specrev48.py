"""Round 48 review (specrev48) of the C++ client's views of another dtype and lazy conjugate/negative bits (cuda48,
hostile48): native_lazy_bits_diff.py, a differential check against the CPU, through a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gpupool.client.native.backend import compiler_missing
from shim_fixtures import ServeProcess

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.skipif(compiler_missing() is not None, reason="native client: no compiler")
def test_the_cpp_client_matches_the_cpu_on_lazy_bits_and_retyped_views(serve: ServeProcess) -> None:
    """Every case of native_lazy_bits_diff.py agrees with the CPU. On dabf16a0 over 60 of its 75 cases were wrong or
    refused (bits dropped, views of another dtype wrong or refused); on 4ebc9e64 (cuda48 + hostile48 merged) the
    in-place writes through a conjugate or negative view (`z.conj().mul_(2)`, `.zero_()`, `.fill_()`, `.add_()`,
    `z.conj().copy_(w)`, `torch._neg_view(z).add_(1)`, autograd through one) were refused ("a copy into a conjugate or
    negative view: not supported") where torch computes them: lazy_bits_copy_ now copies into the view's tensor and
    applies the view's bits to it."""
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(HERE.parents[1])}
    proc = subprocess.run([sys.executable, str(HERE / "native_lazy_bits_diff.py"), serve.address, serve.token()],
                          env=env, capture_output=True, text=True, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got) == 75, sorted(got)
    assert {k: v for k, v in got.items() if v is not True} == {}
