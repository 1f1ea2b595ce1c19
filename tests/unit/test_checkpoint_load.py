"""client/checkpoints.py `wrap_load` on this machine: the containers torch.load returns come back as they were
loaded, changed in place, with their attributes (a state_dict's `_metadata`, which `load_state_dict` reads for the
modules' versions), where the storages move to a device. The device here is `meta` (a stand-in: the gpupool device
needs a daemon and the C++ client, which tests/integration/test_checkpoints.py runs); the wrapper moves storages
whose saved location `target_of` names a device, as it does for `gpupool:N`."""

from __future__ import annotations

import collections
import io
from typing import Any

import torch
from gpupool.client import checkpoints

Pair = collections.namedtuple("Pair", "a b")


def _to_meta(location: Any) -> torch.device | None:
    return torch.device("meta") if location == "cpu" else None


def test_a_loaded_state_dict_keeps_its_metadata_and_containers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    buf = io.BytesIO()
    shared = torch.ones(2)
    torch.save({"model": model.state_dict(), "list": [shared, 3], "pair": Pair(shared, "x")}, buf)
    buf.seek(0)
    loaded = checkpoints.wrap_load(torch.load, _to_meta)(buf, weights_only=False)  # (a namedtuple)
    sd = loaded["model"]
    assert type(sd) is collections.OrderedDict
    assert sd._metadata == model.state_dict()._metadata  # (a pytree map dropped it: until round 34's review)
    assert all(t.device.type == "meta" for t in sd.values())
    assert loaded["list"][0].device.type == "meta" and loaded["list"][1] == 3
    assert type(loaded["pair"]) is Pair and loaded["pair"].b == "x"
    assert loaded["pair"].a is loaded["list"][0], "a tensor held twice stays one tensor"


def test_a_checkpoint_holding_itself_loads() -> None:
    held: dict[str, Any] = {"t": torch.zeros(1)}
    held["self"] = held
    buf = io.BytesIO()
    torch.save(held, buf)
    buf.seek(0)
    loaded = checkpoints.wrap_load(torch.load, _to_meta)(buf, weights_only=False)
    assert loaded["self"] is loaded and loaded["t"].device.type == "meta"
