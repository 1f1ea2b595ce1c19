"""Round 46 (hostile46): enc45's C++ attention backward (native_runner.cpp `attn::run`) inside learned runs, fed
hostile philox_seeds where the learned step had the forward's: a forged buffer of the saved size (its mask bytes
anything but 0 and 1), the previous step's forward's (same shape: another softmax and mask), the generator state
alone (a graph's forward's), a view at an offset, and a buffer whose front is also the query's storage. The runner on
and the Python path alone must say and hold the same after every slice (results, errors, every tensor bit for bit):
the runner's checks of the seed's storage are the Python run's. Pins behaviour that holds on the base (67a03c05)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import test_server_native_seeded as seeded
import torch
from support import native_runner_or_skip

Run, T, V, h, same = seeded.Run, seeded.T, seeded.V, seeded.h, seeded.same
AQ, AK, AV = seeded.AQ, seeded.AK, seeded.AV
SEED = seeded.BASE + 20  # the hostile seed's handle
SAVED = 5056 + 320  # bytes a forward of these shapes keeps: the CPU state, 2x2x4x4 float32 softmax and bool mask


@pytest.fixture(autouse=True)
def runner() -> None:
    native_runner_or_skip()


def _forged() -> torch.Tensor:
    raw = torch.randint(0, 256, (SAVED,), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    return raw.view(torch.int64).as_strided([], [], 0)


def _bind(r: Any, kind: str) -> None:
    """The hostile seed bound as a client's would be (an upload's `select`: its storage all the client's bytes)."""
    s = r.s
    if kind == "forged":
        s.bind(SEED, _forged(), zero=False)
    elif kind == "state":
        s.bind(SEED, torch.Generator().manual_seed(9).get_state().view(torch.int64).as_strided([], [], 0), zero=False)
    elif kind == "offset":
        s.bind(SEED, _forged().as_strided([], [], 1), zero=False)
    elif kind == "alias":  # one storage: the seed's buffer and, at its front, the query
        buf = torch.zeros(SAVED, dtype=torch.uint8)
        buf[:512].view(torch.float32).copy_(torch.randn(128, generator=torch.Generator().manual_seed(6)))
        q = torch.empty(0).set_(buf.untyped_storage(), 0, (2, 2, 4, 8), (64, 32, 8, 1))
        s.bind(AQ, q, zero=False)
        s.bind(SEED, torch.empty(0, dtype=torch.int64).set_(buf.untyped_storage(), 0, (), ()), zero=False)


@pytest.mark.parametrize("kind", ["forged", "previous", "state", "offset", "alias"])
def test_a_hostile_philox_seed_in_a_learned_run_is_taken_as_the_python_path_takes_it(kind: str) -> None:
    """Five learned steps, then three more whose middle backward takes the hostile seed (`kind`)."""
    from gpupool.server import native_runner

    mod = native_runner.load()
    seen, ran = [], []
    for native in (True, False):
        r = Run(native)
        torch.manual_seed(3)
        for handle in (AQ, AK, AV):
            r.s.bind(handle, torch.randn(2, 2, 4, 8))
        cmds = [r.seed(7)]
        for t in range(5):  # learned: the runs run in C++ from here on (with the runner)
            cmds += seeded.attention_step(r, t) + ([r.free(t - 1)] if t else [])
        got = r.stream(cmds, itertools.cycle([64, 9]))
        if kind != "previous":
            _bind(r, kind)
        hostile = SEED if kind != "previous" else h(4, 2)  # step 4's forward's seed, kept (not freed)
        cmds = []
        for t in range(5, 8):
            steps = seeded.attention_step(r, t, seed=hostile if t == 6 else 0)
            cmds += steps + [r.free(t - 1)] if t != 5 else steps
        before = mod.attention_calls()
        got += r.stream(cmds, itertools.cycle([64]))
        ran.append(mod.attention_calls() - before)
        seen.append((got, r.state()))
        r.close()
    (slices_n, state_n), (slices_p, state_p) = seen
    assert slices_n == slices_p
    same(state_n, state_p)
    # with the runner, C++ ran the 3 forwards and the backwards whose seed's storage is the saved size (the hostile
    # one too: its values only change the session's own gradients); it declined the others to the Python run
    assert ran == [6 if kind in ("forged", "previous", "alias") else 5, 0], ran
    errors = [e[1] for _, _, e in slices_p if e is not None]
    assert errors == (["fused attention backward: with dropout, philox_seed must be the forward's (a view of a "
                       "5056-byte generator state)"] if kind == "offset" else []), errors  # fmt: skip
