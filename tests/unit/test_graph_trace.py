"""server/graph_trace.py's safety checks, without a daemon: a trace that would run a dry run's meta device at real
runs is refused, and the range check kept in traced graphs refuses what the Python guard refuses."""

from __future__ import annotations

import warnings

import pytest
import torch
from gpupool.server import graph_trace, guards


def _trace(fn, *args):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(fn, args, check_trace=False)


def test_a_trace_holding_a_meta_constant_is_refused() -> None:
    x = torch.empty(3, device="meta")
    leaky = _trace(lambda t: t + torch.ones(3, device="meta"), x)
    with pytest.raises(ValueError, match="meta constant"):
        graph_trace._no_meta(leaky.graph)
    clean = _trace(lambda t: t * 2 + 1, x)
    graph_trace._no_meta(clean.graph)  # no meta constant: accepted


@pytest.mark.parametrize("indices", [[0, 9, 3], [], [[1, 2], [3, 4]]])
def test_checked_indices_pass_indices_in_range_unchanged(indices: list) -> None:
    t = torch.tensor(indices, dtype=torch.long)
    assert torch.equal(guards.checked_indices(t, 10), t)


@pytest.mark.parametrize("bad", [[0, 10], [-1, 2], [1 << 40]])
def test_checked_indices_refuse_indices_out_of_range(bad: list) -> None:
    with pytest.raises(RuntimeError, match="out of"):
        guards.checked_indices(torch.tensor(bad), 10)
    with pytest.raises(guards.InvalidArgument, match="must lie in"):
        guards._embedding_dense_backward([torch.zeros(len(bad), 2), torch.tensor(bad), 10, -1, False], {})
