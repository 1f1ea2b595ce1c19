"""A message over the daemon's --max-message-size on the session's gRPC stream (journey47): gRPC's receiver refuses it
with RESOURCE_EXHAUSTED "Received message larger than max (N vs. M)", which ends the stream. Until round 47 the
clients reported that as the memory quota's refusal (a torch.OutOfMemoryError, "free tensors and carry on"): now it
is one error naming the size, the limit and `--max-message-size` (gpupool.errors.MessageTooLarge; the torch
clients' DeviceLost: the session is over), while a real quota refusal stays an OutOfMemoryError.

A real daemon (in-process, TLS, loopback) with a 1 MiB --max-message-size; the client's Session on its stream."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from gpupool.client.session import Session
from gpupool.client.torch import errors as torch_errors

from gpupool import errors

MiB = 1024**2


def test_a_message_over_the_daemons_limit_names_it_and_is_no_oom(daemon_factory: Any) -> None:
    daemon = daemon_factory(max_message_bytes=1 * MiB, fake_gpu_memory=64 * MiB)
    with Session.attach_tensors(daemon.address, daemon.token(tenant="too-large")) as s:
        s.upload(torch.ones(256 * 1024, dtype=torch.float32))  # 1 MiB of data: its frame is over 1 MiB
        with pytest.raises(errors.GpupoolError) as got:
            s.sync()
    exc = got.value
    assert isinstance(exc, errors.MessageTooLarge), repr(exc)
    assert exc.code == errors.grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exc.limit == MiB and exc.size > MiB, (exc.size, exc.limit)
    assert "--max-message-size" in str(exc) and str(MiB) in str(exc), str(exc)
    assert not isinstance(exc, errors.ResourceExhausted)
    seen = torch_errors.translate(exc)  # what either torch client raises for it
    assert not isinstance(seen, torch.OutOfMemoryError), repr(seen)
    assert isinstance(seen, torch_errors.DeviceLost) and "--max-message-size" in str(seen), repr(seen)
    back = pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own exception, this process's bytes
    assert (type(back), back.size, back.limit, str(back)) == (type(exc), exc.size, exc.limit, str(exc))

    # A real quota refusal on the same daemon (a message under its limit) is still the torch OutOfMemoryError.
    with Session.attach_tensors(daemon.address, daemon.token(tenant="quota", quota_bytes=256 * 1024)) as s:
        s.upload(torch.ones(128 * 1024, dtype=torch.float32))  # 512 KiB: over the quota, under the message limit
        with pytest.raises(errors.ResourceExhausted) as quota:
            s.sync()
    assert not isinstance(quota.value, errors.MessageTooLarge)
    assert isinstance(torch_errors.translate(quota.value), torch.OutOfMemoryError), repr(quota.value)
