"""The pure parts of `--cuda` (client/cuda): which device arguments map where, and that the torch
entry point does nothing unless $GPUPOOL_CUDA asks for it (a process-wide switch, so checked in a child)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gpupool.client.cuda import devices, requested
from support import communicate

import gpupool.torch  # noqa: F401 - registers the device type the mapping targets

GP = "gpupool"


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("cuda", torch.device(GP)),
        ("cuda:1", torch.device(GP, 1)),
        (torch.device("cuda"), torch.device(GP)),
        (torch.device("cuda", 2), torch.device(GP, 2)),
        (0, torch.device(GP, 0)),
        (3, torch.device(GP, 3)),
        ("cpu", "cpu"),
        (torch.device("cpu"), torch.device("cpu")),
        ("cudax", "cudax"),
        (True, True),
        (None, None),
    ],
)
def test_to_gpupool(given: object, want: object) -> None:
    assert devices.to_gpupool(given) == want


def test_map_location_keeps_strings_strings_and_maps_dicts() -> None:
    assert devices.map_location("cuda:0") == "gpupool:0"
    assert devices.map_location(torch.device("cuda", 1)) == torch.device(GP, 1)
    assert devices.map_location({"cuda:0": "cuda:1", "cpu": "cpu"}) == {"cuda:0": "gpupool:1", "cpu": "cpu"}
    assert devices.map_location("cpu") == "cpu"
    fn = lambda storage, loc: storage  # noqa: E731
    assert devices.map_location(fn) is fn


@pytest.mark.parametrize(("value", "on"), [("", False), ("0", False), ("false", False), ("1", True), ("yes", True)])
def test_requested_reads_gpupool_cuda(monkeypatch: pytest.MonkeyPatch, value: str, on: bool) -> None:
    monkeypatch.setenv("GPUPOOL_CUDA", value)
    assert requested() is on


CHILD = """
import torch
from gpupool.client import cuda
print(cuda.enabled(), torch.cuda.is_available(), torch._C._get_privateuse1_backend_name())
"""


def start_child(**env: str) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if k != "GPUPOOL_CUDA"}
    cmd = [sys.executable, "-c", CHILD]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**base, **env})


def child_output(child: subprocess.Popen[str]) -> str:
    stdout, stderr = communicate(child, 120)
    assert child.returncode == 0, stderr
    return stdout.strip()


def test_autoload_at_import_torch_only_with_gpupool_cuda() -> None:
    # the three children side by side (one after the other until round 25: each imports torch)
    plain, cuda, no_autoload = (
        start_child(),
        start_child(GPUPOOL_CUDA="1"),
        start_child(GPUPOOL_CUDA="1", TORCH_DEVICE_BACKEND_AUTOLOAD="0"),
    )
    assert child_output(plain) == "False False privateuseone"
    assert child_output(cuda) == "True True gpupool"  # no scheduler is asked until a tensor moves
    assert child_output(no_autoload) == "False False privateuseone"


def test_pin_memory_works_with_gpupool_registered_and_without_cuda() -> None:
    """torch's own kernel raises NotImplementedError for the PrivateUse1 backend, breaking DataLoaders."""
    assert torch._C._get_privateuse1_backend_name() == GP and not requested()
    x = torch.arange(6.0)
    pinned = x.pin_memory()
    assert torch.equal(pinned, x) and pinned.data_ptr() != x.data_ptr()
    data = torch.utils.data.TensorDataset(torch.arange(6.0))
    batches = list(torch.utils.data.DataLoader(data, batch_size=4, pin_memory=True))
    assert [b[0].tolist() for b in batches] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0]]


def test_a_torchrun_rank_maps_cuda_numbers_of_the_lease_onto_its_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank LOCAL_RANK=1 of a 2-device lease sees its own device as gpupool:0 (client/torch/api.py), so the
    script's cuda:1 / model.to(1) / DDP device_ids=[1] must be gpupool:0 there, and cuda:0 the other device."""
    from gpupool.client.cuda import nccl

    monkeypatch.setattr(devices, "_SHIFT", [(1, 2)])
    assert devices.to_gpupool(1) == devices.to_gpupool("cuda:1") == torch.device(GP, 0)
    assert devices.to_gpupool(torch.device("cuda", 0)) == torch.device(GP, 1)
    assert devices.to_gpupool("cuda") == torch.device(GP)  # the current device (set_device(local_rank) -> 0)
    assert [devices.cuda_index(i) for i in (0, 1)] == [1, 0] and devices.pool_index(5) == 5  # out of range: as is
    assert devices.parse_to(1)[0] == torch.device(GP, 0)  # Module.to(local_rank)
    assert devices.parse_to(device="cuda:0")[0] == torch.device(GP, 1)
    assert [nccl._ddp_index(d) for d in (1, torch.device("cuda", 1), "cuda:0", None)] == [0, 0, 1, None]
    monkeypatch.setattr(devices, "_SHIFT", [(0, 2)])  # one process holding the whole lease: numbers as they are
    assert devices.to_gpupool(1) == torch.device(GP, 1) and devices.cuda_index(1) == 1


def _index_via_accelerator(device: object) -> int:
    """What torch.accelerator's functions (set_device_index, synchronize, ...: this one stands for them) make of a
    device argument their caller passes."""
    return torch.accelerator._get_device_index(device)  # type: ignore[attr-defined,no-any-return]


# The same calls from torch's own code (a module named torch.*), which hands torch.accelerator gpupool's numbers
_TORCHS_OWN: dict[str, object] = {"__name__": "torch._gpupool_test", "torch": torch, "via": _index_via_accelerator}
exec(  # noqa: S102 - a stand-in for a torch module's frame: the wrappers look at their caller's module name
    "def index(d): return via(d)\ndef accelerator(): return torch.accelerator.current_accelerator()\n", _TORCHS_OWN
)


def test_a_torchrun_ranks_accelerator_is_cuda_in_cuda_numbers_for_the_script_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under the mapping torch.accelerator answers the script as CUDA would (`cuda`, CUDA's numbers: rank 1's
    set_device_index(1) is its own device, gpupool:0), and torch's own code as before (gpupool, gpupool's numbers)."""
    monkeypatch.setattr(devices, "_SHIFT", [(1, 2)])
    devices.install()
    try:
        assert torch.accelerator.current_accelerator() == torch.device("cuda")
        assert _TORCHS_OWN["accelerator"]() == torch.device(GP)  # type: ignore[operator]
        assert [_index_via_accelerator(i) for i in (0, 1)] == [1, 0]
        assert [_TORCHS_OWN["index"](i) for i in (0, 1)] == [0, 1]  # type: ignore[operator]
        assert torch.accelerator.is_available() and torch.accelerator.device_count() >= 1  # torch's callers: gpupool
        assert torch.accelerator.current_device_index() == devices.cuda_index(torch._C._accelerator_getDeviceIndex())
        with pytest.warns(FutureWarning, match="current_device_index"):  # torch's deprecated name: the same answer
            assert torch.accelerator.current_device_idx() == torch.accelerator.current_device_index()
    finally:
        devices.uninstall()
    assert torch.accelerator.current_accelerator() == torch.device(GP) and _index_via_accelerator(1) == 1


@pytest.mark.parametrize(("asked", "ok"), [("nccl", True), ("NCCL", True), ("cuda:nccl", True),
                                           ("cpu:gloo,cuda:nccl", False), ("cuda:nccl,cpu:gloo", False)])  # fmt: skip
def test_nccl_backend_strings(asked: str, ok: bool) -> None:
    from gpupool.client.cuda import nccl

    if ok:
        assert nccl._translate(asked) == "gpupool"
    else:
        with pytest.raises(RuntimeError, match="not available on a pooled GPU"):
            nccl._translate(asked)


DIST_CHILD = """
import datetime, sys, warnings
import torch, torch.distributed as dist
from torch.distributed import TCPStore
from torch.distributed.constants import default_pg_timeout
assert dist.is_nccl_available()
with warnings.catch_warnings():  # a torch without NCCL warned here that NCCL is not compiled (until round 33)
    warnings.simplefilter("error")
    assert dist.distributed_c10d._get_default_timeout(dist.Backend("nccl")) == default_pg_timeout
store = TCPStore("127.0.0.1", 0, 1, True)
try:
    dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=0, world_size=1)
except RuntimeError as exc:
    assert "'cpu:gloo,cuda:nccl' is not available on a pooled GPU" in str(exc), exc
else:
    raise AssertionError("mixed nccl string accepted")
dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=20))
assert dist.get_backend() == "gloo"
t = torch.ones(3)
dist.all_reduce(t)
print("ok", t.tolist())
"""


def test_under_cuda_gloo_still_works_and_mixed_nccl_strings_are_refused() -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("GPUPOOL_LEASE",)}
    env = {**base, "GPUPOOL_CUDA": "1"}
    done = subprocess.run([sys.executable, "-c", DIST_CHILD], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok [1.0, 1.0, 1.0]"


@pytest.mark.parametrize(
    ("local_rank", "rank", "current", "want"),
    [
        ("1", 1, 0, (0, 1)),  # torchrun: the rank's own lease device LOCAL_RANK is its gpupool:0
        ("0", 0, 0, (0, 0)),
        (None, 1, 1, (1, 1)),  # mp.spawn after torch.cuda.set_device(rank): the current device, lease numbering
        (None, 1, 0, (1, 1)),  # mp.spawn without set_device: rank mod n, NCCL's guess
        (None, 3, 0, (1, 1)),
        (None, 0, 0, (0, 0)),
    ],
)
def test_a_ranks_own_device_with_and_without_torchrun(
    monkeypatch: pytest.MonkeyPatch, local_rank: str | None, rank: int, current: int, want: tuple[int, int]
) -> None:
    """client/distributed.py `_own_device`: (gpupool index, lease index) of the device a rank's group binds; until round
    33 a process without LOCAL_RANK (torch.multiprocessing.spawn) bound gpupool:0 while claiming lease device `rank`."""
    from gpupool.client import distributed

    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert distributed._own_device(rank, 2, current) == want


def test_a_rank_past_the_lease_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpupool.client import distributed

    from gpupool.errors import InvalidArgument

    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(InvalidArgument, match="LOCAL_RANK 2 but the lease has 2 device"):
        distributed._own_device(2, 2, 0)
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(InvalidArgument, match="rank 0 is on gpupool:3 but the lease has 2 device"):
        distributed._own_device(0, 2, 3)


def test_a_groups_device_id_is_the_device_it_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    """`init_process_group("gpupool", device_id=torch.device("gpupool", N))`: `_own_device(..., named=N)` binds
    gpupool:N (until round 36 torch failed first: "No backend type associated with device type gpupool"); under
    torchrun another rank's device is refused with pool.rank_device's rule, and without torchrun the named device wins
    over NCCL's `rank mod n` guess."""
    from gpupool.client import distributed

    from gpupool.errors import InvalidArgument

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed._own_device(1, 2, 0, named=0) == (0, 1)  # the rank's own device, lease device 1
    with pytest.raises(InvalidArgument, match="gpupool:1 is lease device 0 here, local rank 0's own device"):
        distributed._own_device(1, 2, 0, named=1)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert distributed._own_device(1, 2, 0, named=0) == (0, 0)
    assert distributed._own_device(0, 2, 0, named=1) == (1, 1)
    with pytest.raises(InvalidArgument, match="device_id gpupool:5 but the lease has 2 device"):
        distributed._own_device(0, 2, 0, named=5)


# ---- the wrappers (devices.install): in this process, taken out again after each test ----


@pytest.fixture
def mapped(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(devices, "_SHIFT", [(0, 2)])  # a 2-device lease, no torchrun
    devices.install()
    try:
        yield
    finally:
        devices.uninstall()


def declared_device_functions(stub: str, section: str | None = None) -> set[str]:
    """Names of the functions that torch's own type stubs (torch/_C/*.pyi) declare with a `device` parameter."""
    path = Path(torch.__file__).parent / "_C" / stub
    if not path.exists():
        pytest.skip(f"torch ships no {stub}")
    text, indent = path.read_text(), ""
    if section is not None:  # the class's methods: indented, up to the next top-level line
        text, indent = text[text.index(f"class {section}(") :], "    "
        text = text[: re.search(r"\n(?=[^\s#])", text).start()]  # type: ignore[union-attr]
    defs = re.finditer(rf"^{indent}def (\w+)\((.*?)\)\s*->", text, re.S | re.M)
    return {m[1] for m in defs if re.search(r"\bdevice\b", m[2])}


def test_every_builtin_torch_declares_with_a_device_is_wrapped(mapped: None) -> None:
    """The wrappers are found in torch's schemas and docstrings at install time; torch's stubs are a third, independent
    list (tests only): a factory torch adds, or one found by a source that breaks, fails here."""
    factories = declared_device_functions("_VariableFunctions.pyi")
    # not torch functions (constructors; the subclass authors' _make_wrapper_subclass): no mapping ever saw them
    methods = declared_device_functions("__init__.pyi", "TensorBase") - {"__init__", "__new__", "new",
                                                                          "_make_wrapper_subclass"}  # fmt: skip
    assert {"zeros", "randn", "tensor", "asarray", "zeros_like"} <= factories
    assert {"new_zeros", "new_tensor", "to", "cuda"} <= methods
    missed = [f"torch.{n}" for n in sorted(factories) if not hasattr(getattr(torch, n), "_gpupool_cuda")]
    missed += [f"Tensor.{n}" for n in sorted(methods) if not hasattr(getattr(torch.Tensor, n), "_gpupool_cuda")]
    missed += [f"{ns}.fftfreq" for ns in ("torch.fft",) if not hasattr(torch.fft.fftfreq, "_gpupool_cuda")]
    assert not missed, missed
    assert hasattr(torch._C._nn._parse_to, "_gpupool_cuda") and isinstance(vars(torch.Tensor)["is_cuda"], property)
    assert not hasattr(torch.add, "_gpupool_cuda") and not hasattr(torch.Tensor.add, "_gpupool_cuda")  # no device


@pytest.mark.parametrize(
    ("kwargs", "want"),
    [
        ({"device": "cuda:1"}, {"device": torch.device(GP, 1)}),
        ({"device": torch.device("cuda")}, {"device": torch.device(GP)}),
        ({"device": 1, "dtype": torch.float16}, {"device": torch.device(GP, 1), "dtype": torch.float16}),
        ({"device": "cpu"}, {"device": "cpu"}),
        ({"device": True}, {"device": True}),
        ({"device": None}, {"device": None}),
        ({}, {}),
    ],
)
def test_a_factory_wrapper_rewrites_the_device_keyword(mapped: None, kwargs: dict, want: dict) -> None:
    record = devices._mapping_device_kwarg(lambda *a, **k: (a, k))
    assert record(3, "cuda:1", **kwargs) == ((3, "cuda:1"), want)  # positional arguments are never a factory's device


def test_to_cuda_and_parse_to_read_a_device_in_first_place_or_by_keyword(mapped: None) -> None:
    first = devices._device_first
    assert first(("cuda:1", torch.float16), {}) == (torch.device(GP, 1), torch.float16)
    assert first((0,), {}) == (torch.device(GP, 0),)  # an integer id: model.to(local_rank)
    assert first((torch.float16,), {}) == (torch.float16,) and first((True,), {}) == (True,)
    kwargs = {"device": "cuda", "non_blocking": True}
    assert first((), kwargs) == () and kwargs == {"device": torch.device(GP), "non_blocking": True}
    x = torch.arange(3.0)  # CPU calls pass through the wrappers unchanged
    assert x.to(torch.float64).dtype == torch.float64 and x.to("cpu", torch.float16).dtype == torch.float16
    assert torch.nn.Linear(2, 2).to(torch.float64).weight.dtype == torch.float64
    assert torch.zeros(2, device="cpu").device.type == "cpu" and not x.is_cuda
    assert x.new_zeros(2, device="cpu").device.type == "cpu"


SPARSE = "sparse tensors are not available on a pooled GPU (gpupool run --cuda)"


def _with_buffer(t: torch.Tensor) -> torch.nn.Module:
    module = torch.nn.Module()
    module.register_buffer("adj", t)
    return module


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta", "ignore:Sparse invariant checks")
def test_sparse_tensors_onto_the_device_are_one_clear_error(mapped: None) -> None:
    """pytorch/examples' gcn moves its sparse COO features and adjacency matrix to the device
    (`adj_mat.to_sparse().to(device)`): one RuntimeError naming the way out, for every way a sparse tensor would reach
    gpupool, before any device is contacted. Until round 39 torch's own error ("Could not run
    '_sparse_coo_tensor_with_dims_and_tensors' ... from the 'Sparsegpupool' backend", on the shim "layout
    torch.sparse_coo is not supported"), and a CSR tensor moved and then failed at its first op ("values expected
    sparse tensor layout but got SparseCsr"). On the CPU the wrappers change nothing."""
    eye = torch.eye(3)
    moves = {
        ".to()": lambda: eye.to_sparse().to("cuda"),
        ".to(device=, dtype=)": lambda: eye.to_sparse().to(device=0, dtype=torch.float64),
        ".cuda()": lambda: eye.to_sparse().cuda(),
        "CSR .to()": lambda: eye.to_sparse_csr().to(torch.device("cuda", 0)),
        "Module.to()": lambda: _with_buffer(eye.to_sparse()).to("cuda"),
        "sparse_coo_tensor(device=)": lambda: torch.sparse_coo_tensor([[0], [1]], [1.0], (2, 2), device="cuda"),
        "sparse_csr_tensor(device=)": lambda: torch.sparse_csr_tensor([0, 1, 1], [1], [1.0], (2, 2), device="cuda:0"),
    }
    for what, move in moves.items():
        with pytest.raises(RuntimeError, match=re.escape(SPARSE)) as caught:
            move()
        assert "to_dense()" in str(caught.value), what
    assert eye.to_sparse().to("cpu", torch.float64).to_sparse_csr().layout == torch.sparse_csr
    assert torch.sparse_coo_tensor([[0], [1]], [1.0], (2, 2), device="cpu").to_dense().tolist() == [[0, 1], [0, 0]]
    assert eye.to_sparse().to(torch.float16).dtype == torch.float16  # no device: a dtype change only


def test_default_device_contexts_still_see_torchs_factories() -> None:
    """`with torch.device(...)` / set_default_device: torch's mode matches its factories by identity, in a list it
    caches on first use; install() fills it with torch's own builtins before it wraps them."""
    from torch.utils._device import _device_constructors

    _device_constructors.cache_clear()
    devices.install()
    try:
        with torch.device("meta"):
            assert torch.zeros(2).device.type == "meta" and torch.nn.Linear(2, 2).weight.device.type == "meta"
    finally:
        devices.uninstall()


def test_torchscript_compiles_code_calling_wrapped_factories(mapped: None) -> None:
    def f(n: int) -> torch.Tensor:
        return torch.zeros(n) + torch.ones(n, device="cpu")

    assert torch.jit.script(f)(3).tolist() == [1.0, 1.0, 1.0]


def test_uninstall_puts_torchs_own_functions_back() -> None:
    zeros, to, is_cuda, parse_to = torch.zeros, torch.Tensor.to, torch.Tensor.is_cuda, torch._C._nn._parse_to
    devices.install()
    assert torch.zeros is not zeros and "new_zeros" in vars(torch.Tensor)
    devices.uninstall()
    assert torch.zeros is zeros and torch.Tensor.to is to and torch.Tensor.is_cuda is is_cuda
    assert "new_zeros" not in vars(torch.Tensor) and torch._C._nn._parse_to is parse_to


def test_module_apply_keeps_the_parameter_objects_and_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """`.cuda()` of a model with a tied weight (decoder.weight = encoder.weight). torch moves a Parameter onto a GPU
    in place (the optimizer built before keeps working, the tie stays), which it cannot do onto a PrivateUse1 device:
    there it makes a new Parameter per module that holds it (two weights, trained apart; an optimizer built before
    holds the CPU ones). torch does the same on the CPU when told to overwrite parameters on conversion, the stand-in
    here for a move onto gpupool (tests/cuda_scripts/word_lm_tied.py moves onto a fake GPU)."""
    from gpupool.client.cuda import patches

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Embedding(10, 4)
            self.decoder = torch.nn.Linear(4, 10)
            self.decoder.weight = self.encoder.weight
            self.register_buffer("steps", torch.zeros(()))

    monkeypatch.setattr(torch.__future__, "_overwrite_module_params_on_conversion", True)
    untied = torch.nn.Module._apply(Tied(), lambda t: t.double())
    assert untied.decoder.weight is not untied.encoder.weight  # torch's own _apply: two copies
    model = Tied()
    weight, bias, steps = model.encoder.weight, model.decoder.bias, model.steps
    out = patches._apply_keeping_ties(model, lambda t: t.double())
    assert out is model and model.decoder.weight is model.encoder.weight is weight
    assert model.decoder.bias is bias and model.steps is steps and isinstance(weight, torch.nn.Parameter)
    assert model.encoder.weight.dtype == torch.float64 and len(list(model.parameters())) == 2
    assert model.steps.dtype == torch.float64


def test_a_whole_model_placed_after_torch_load_runs_its_rnns_on_the_placed_weights() -> None:
    """torch.load of a whole model (`torch.save(model)`, word_language_model's checkpoint) under --cuda restores its
    storages on the CPU, then `_place` puts each moved Parameter into its module's table. nn.LSTM's forward reads
    `_flat_weights`, a list unpickled with the CPU Parameters: it kept using (and training) those, not the placed
    ones the optimizer holds. The meta device stands in for a gpupool one (no pool here; tests/cuda_scripts/
    word_lm_tied.py loads onto a fake GPU, where only the values were compared, and they are equal right after a
    load)."""
    import io

    from gpupool.client import checkpoints

    buf = io.BytesIO()
    torch.save(torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.LSTM(4, 4), torch.nn.GRU(4, 4)), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    targets = {p.untyped_storage().data_ptr(): torch.device("meta") for p in loaded.parameters()}
    placed = checkpoints.place(loaded, targets, {})
    for rnn in (placed[1], placed[2]):
        names = rnn._flat_weights_names
        assert [w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, names, strict=True)] == [True] * len(names)
        assert {w.device.type for w in rnn._flat_weights} == {"meta"}
