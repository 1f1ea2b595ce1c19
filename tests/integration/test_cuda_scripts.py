"""`gpupool run --cuda`: ordinary CUDA training scripts (tests/cuda_scripts/, written the way public PyTorch
examples are, no gpupool import) run unmodified on a real `gpupool up` with fake GPUs and print the losses of the
same script on the CPU (CUDA_VISIBLE_DEVICES="", no --cuda), within float32 rounding: the CPU run is a fresh process
(support.assert_float32_close says why not bit for bit). The torch.cuda facade and the refusals are checked by
facade_check.py under a 2-GPU lease; without --cuda torch is untouched."""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from examples_fixtures import gpupool_up
from gpupool.client.pool import SchedulerClient
from scheduler_fixtures import ROOT, wait_until
from support import assert_loss_lines_close, warmed_python

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parent.parent / "cuda_scripts"
LOSS = re.compile(r"^(?:step|epoch) .*loss \S+$", re.M)
ANNOUNCE = "gpupool --cuda: cuda -> gpupool"


@pytest.fixture(scope="module")
def pool(two_gpu_pool: str) -> str:
    """The shared pool of two 512 MiB fake GPUs (conftest.py: two_gpu_pool); the scheduler's address."""
    return two_gpu_pool


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GPUPOOL_LEASE", "GPUPOOL_CUDA")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def launch(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=SCRIPTS)


def checked(cmd: list[str], done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"{cmd}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return checked(cmd, launch(cmd, env))


def on_pool(
    pool: str, script: str, *run_args: str, cuda: bool = True, script_args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    flags = ["--cuda"] if cuda else []
    cmd = [sys.executable, "-m", "gpupool.cli", "run", *flags, *run_args, "--", sys.executable, script, *script_args]
    return run(cmd, clean_env(GPUPOOL_SCHEDULER=pool))


def cpu_env(**extra: str) -> dict[str, str]:
    """A run on the CPU: no CUDA device, and none of gpupool's switches (not even $GPUPOOL_CLIENT's backend)."""
    env = clean_env(CUDA_VISIBLE_DEVICES="", **extra)
    env.pop("GPUPOOL_CLIENT", None)
    return env


# The CPU runs are references: each script is seeded, so it prints the same on every run, and several tests (here,
# test_native_client_cuda.py, test_native_client_devices.py) compare their pooled runs of one script with its CPU run.
# Each runs once per test session (functools.cache); a pooled run is never cached, but for amp_on_pool below.
@functools.cache
def on_cpu(*args: str) -> subprocess.CompletedProcess[str]:
    """`python ARGS` (a script in tests/cuda_scripts, or -c CODE) on the CPU, MKL's vector math warmed first as in a
    session worker (support.warmed_python)."""
    return run(warmed_python(*args), cpu_env())


P = TypeVar("P")
R = TypeVar("R")


def beside(pooled: Callable[[], P], reference: Callable[..., R], *args: Any) -> tuple[P, R]:
    """`pooled()` (a run on the pool) with its CPU reference `reference(*args)` (on_cpu, torchrun_on_cpu: cached, at
    once when an earlier test ran it) run beside it in a thread, as the DDP tests below did already: the pooled run
    spends much of its time waiting on its daemons (round 54: one after the other until then). Both results."""
    with ThreadPoolExecutor(1) as thread:
        local = thread.submit(reference, *args)
        return pooled(), local.result()


@functools.cache
def amp_on_pool(pool: str) -> subprocess.CompletedProcess[str]:
    """The one pooled run kept for the session: `gpupool run --cuda --client shim -p 0.5 -- python amp.py` (the
    Python client). Checked here against the CPU; test_native_client_cuda.py checks the C++ client's run of amp.py
    against it bit for bit."""
    return on_pool(pool, "amp.py", "--client", "shim", "-p", "0.5")


def values(lines: list[str]) -> list[float]:
    return [float(line.rsplit(" ", 1)[1]) for line in lines]


def no_leases(address: str) -> bool:
    return not SchedulerClient(address).list_pool().leases


@pytest.mark.parametrize(
    "script", ["mnist_style.py", "device_agnostic.py", "checkpoint.py", "amp.py", "lstm_lm.py", "custom_function.py"]
)
def test_unmodified_script_gives_the_cpu_losses(pool: str, script: str) -> None:
    pooled, local = beside(
        lambda: amp_on_pool(pool) if script == "amp.py" else on_pool(pool, script, "-p", "0.5"), on_cpu, script
    )
    losses = LOSS.findall(pooled.stdout)
    assert len(losses) >= 4, pooled.stdout
    if script == "amp.py":  # float16 matmuls on the pool (autocast), float32 on the CPU (AMP off there)
        assert values(losses) == pytest.approx(values(LOSS.findall(local.stdout)), rel=1e-3)
        assert losses != LOSS.findall(local.stdout)  # autocast really computed in float16
    else:  # the CPU run is a fresh process: within float32 rounding (support.assert_float32_close)
        assert_loss_lines_close(losses, LOSS.findall(local.stdout))
    assert ANNOUNCE in pooled.stderr and ANNOUNCE not in local.stderr
    if script == "device_agnostic.py":  # the script took its CUDA branch on the pool, its CPU branch locally
        assert "done on cuda" in pooled.stdout and "done on cpu" in local.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def torchrun(script: str, ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), script]


# What a rank of torch's gloo on the CPU printed when it aborted as it exited, after its last line (round 27's loaded
# run of the suite: rank 0 of ddp_torchrun.py, SIGABRT once its process group was destroyed)
ABORT_AT_EXIT = "terminate called without an active exception"


@functools.cache
def torchrun_on_cpu(script: str, ranks: int) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc-per-node RANKS SCRIPT` on the CPU (gloo; one OpenMP thread per rank). A reference: a run whose
    rank aborted in torch's teardown (ABORT_AT_EXIT) is made once more (the script is seeded: the same lines)."""
    cmd, env = torchrun(script, ranks), cpu_env(OMP_NUM_THREADS="1")
    done = launch(cmd, env)
    if done.returncode != 0 and ABORT_AT_EXIT in done.stderr:
        done = launch(cmd, env)
    return checked(cmd, done)


RANK_LINE = re.compile(r"^rank (\d) on (\S+) \(current device (\S+)\) weight sum (\S+)$", re.M)


def test_torchrun_ddp_script_with_nccl_gives_the_cpu_losses(pool: str) -> None:
    """`gpupool run --cuda -n 2 -- torchrun --nproc-per-node 2 ddp_torchrun.py`: nccl is the gpupool backend (while
    get_backend() says nccl), cuda:LOCAL_RANK is each rank's own leased device; losses and the trained weights equal
    the same script under torchrun on the CPU with gloo (2 processes, the same DistributedSampler shards)."""
    with ThreadPoolExecutor(1) as beside:  # the CPU reference runs beside the pooled run
        cpu = beside.submit(torchrun_on_cpu, "ddp_torchrun.py", 2)
        pooled = run(
            [sys.executable, "-m", "gpupool.cli", "run", "--cuda", "-n", "2", "-p", "0.5", "--",
             *torchrun("ddp_torchrun.py", 2)],
            clean_env(GPUPOOL_SCHEDULER=pool, OMP_NUM_THREADS="1"),
        )  # fmt: skip
        local = cpu.result()
    losses, reference = values(LOSS.findall(pooled.stdout)), values(LOSS.findall(local.stdout))
    assert len(losses) == 8 and len(reference) == 8, pooled.stdout + local.stdout
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-7)
    assert sum(losses[4:]) < sum(losses[:4])  # it trained: the second epoch's losses are lower
    ranks = sorted(RANK_LINE.findall(pooled.stdout))
    assert [r[:3] for r in ranks] == [("0", "cuda:0", "0"), ("1", "cuda:1", "1")], pooled.stdout
    cpu_ranks = sorted(RANK_LINE.findall(local.stdout))
    assert [r[1] for r in cpu_ranks] == ["cpu", "cpu"], local.stdout
    sums = [float(r[3]) for r in ranks + cpu_ranks]
    assert sums[0] == sums[1] and sums == pytest.approx([sums[2]] * 4, rel=1e-5)  # DDP kept the ranks in step
    assert pooled.stderr.count(ANNOUNCE) >= 2 and "(2 leased device(s)" in pooled.stderr  # (and torchrun's own)
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def two_ranks_and_cpu(
    pool: str, script: str, client: tuple[str, ...]
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """`gpupool run --cuda CLIENT -n 2 -p 0.5 -- torchrun --nproc-per-node 2 SCRIPT` and, beside it, the same
    torchrun on the CPU (gloo): both runs."""
    with ThreadPoolExecutor(1) as beside:
        cpu = beside.submit(torchrun_on_cpu, script, 2)
        pooled = run(
            [sys.executable, "-m", "gpupool.cli", "run", "--cuda", *client, "-n", "2", "-p", "0.5", "--",
             *torchrun(script, 2)],
            clean_env(GPUPOOL_SCHEDULER=pool, OMP_NUM_THREADS="1"),
        )  # fmt: skip
        return pooled, cpu.result()


TP_STEP = re.compile(r"^step \d rank \d loss \S+$", re.M)
TP_END = re.compile(r"^rank \d tp allreduce .*$", re.M)


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_tensor_parallel_2d_mesh_without_a_backend_gives_the_cpu_losses(pool: str, client: tuple[str, ...]) -> None:
    """tensor_parallel.py (pytorch/examples' tensor_parallelism: `init_device_mesh` makes the default group with no
    backend named, torch's "undefined"; a (1, 2) mesh whose "tp" dimension is a subgroup; ColwiseParallel /
    RowwiseParallel, AdamW foreach) under `gpupool run --cuda -n 2 -- torchrun`: every step's loss, the subgroup's
    allreduce and the full weights equal gloo's on the CPU, on both clients. Until round 47 every rank failed at
    `init_device_mesh`: the subgroup of a group made without a backend was refused as a second group ("a second gpupool
    process group on gpupool:0 (rank 0 of 2)")."""
    pooled, local = two_ranks_and_cpu(pool, "tensor_parallel.py", client)
    lines = sorted(TP_STEP.findall(pooled.stdout) + TP_END.findall(pooled.stdout))
    reference = sorted(TP_STEP.findall(local.stdout) + TP_END.findall(local.stdout))
    assert len(lines) == 10 and "tp allreduce 3.0" in lines[0], pooled.stdout
    assert lines == reference, pooled.stdout + local.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


FSDP_STEP = re.compile(r"^step \d+ grad norm (\S+) loss (\S+)$", re.M)
FSDP_RANK = re.compile(r"^rank (\d) mesh (\S+) shard (\S+) weight sum (\S+)$", re.M)
FSDP_RELOAD = re.compile(r"^rank (\d) reloaded (\S+) scattered (\[.*?\]) columns (\[.*\])$", re.M)
FSDP_HELD = re.compile(r"^rank (\d) step (\d) of a (\d+)-byte model holds (\d+)$", re.M)


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_torchrun_fsdp2_script_gives_the_cpu_losses(pool: str, client: tuple[str, ...]) -> None:
    """fsdp2.py (torch's FSDP2 tutorial style: `init_device_mesh("cuda", (2,))`, `fully_shard` per layer and on the
    model built on the CPU, Adam, `clip_grad_norm_` over DTensor gradients, `full_tensor()`) under `gpupool run --cuda
    -n 2 -- torchrun --nproc-per-node 2`, on both clients: every gradient norm and loss, and the gathered weights, equal
    the same script on a CPU mesh with gloo within 1e-5; so do the weights after a full state dict went out and came
    back from rank 0 (DCP's `set_model_state_dict`), `distribute_tensor` scatters rank 0's tensor and `redistribute`
    reshards it by columns; and between steps each rank holds about its half of an 8 MiB model sharded the same way
    (`torch.cuda.memory_allocated()`: the daemon's count of its session's bytes), as on a GPU, where until round 37 it
    held the whole model besides (FSDP2's `untyped_storage().resize_(0)` of its unsharded parameters went nowhere:
    1.5x the model). Until round 36
    `init_device_mesh` failed: "ProcessGroup name not set" (then, one at a time: a "cuda" mesh FSDP2 found no parameter
    on, CPU tensors it could not move in place, storages it could not resize, functional collectives torch sent to a
    C++ backend the group has not, a group with no device types, no scatter, no all-to-all)."""
    pooled, local = two_ranks_and_cpu(pool, "fsdp2.py", client)
    steps, reference = FSDP_STEP.findall(pooled.stdout), FSDP_STEP.findall(local.stdout)
    assert len(steps) == 6 and len(reference) == 6, pooled.stdout + local.stdout
    assert [float(v) for s in steps for v in s] == pytest.approx([float(v) for s in reference for v in s], abs=1e-5)
    ranks, cpu_ranks = sorted(FSDP_RANK.findall(pooled.stdout)), sorted(FSDP_RANK.findall(local.stdout))
    assert [r[:3] for r in ranks] == [("0", "gpupool", "gpupool:0"), ("1", "gpupool", "gpupool:0")], pooled.stdout
    assert [r[:3] for r in cpu_ranks] == [("0", "cpu", "cpu"), ("1", "cpu", "cpu")], local.stdout
    sums = [float(r[3]) for r in ranks + cpu_ranks]
    assert sums == pytest.approx([sums[2]] * 4, abs=1e-5)
    reloaded, cpu_reloaded = sorted(FSDP_RELOAD.findall(pooled.stdout)), sorted(FSDP_RELOAD.findall(local.stdout))
    columns = [
        [[4.0 * i + j for j in (2 * r, 2 * r + 1)] for i in range(4)] for r in (0, 1)
    ]  # of arange(16).view(4, 4)
    scattered = [("0", "[0.0, 1.0, 2.0, 3.0]", str(columns[0])), ("1", "[4.0, 5.0, 6.0, 7.0]", str(columns[1]))]
    assert [(r, v, c) for r, _, v, c in reloaded] == [(r, v, c) for r, _, v, c in cpu_reloaded] == scattered, (
        pooled.stdout
    )  # rank 0's tensor sharded (a scatter), then by columns (DTensor's all-to-all)
    assert [float(s) for _, s, _, _ in reloaded + cpu_reloaded] == pytest.approx([sums[2]] * 4, abs=1e-5)
    held = FSDP_HELD.findall(pooled.stdout)
    assert len(held) == 4, pooled.stdout
    for rank, step, model, nbytes in held:  # its half of the 8 MiB model and a little: never the whole model as well
        assert int(model) // 2 <= int(nbytes) < int(model) // 2 + int(model) // 8, (rank, step, nbytes, model)
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


RESULT = re.compile(r"^rank (\d) (\S+) (.*)$", re.M)
CLIENTS = [(), ("--client", "shim")]


@functools.cache
def collectives_on_pool(pool: str, client: tuple[str, ...]) -> dict[tuple[str, str], str]:
    """collectives.py under `gpupool run --cuda -n 2 -- torchrun --nproc-per-node 2` (its `nccl` is the gpupool
    backend), one run per client for the tests below: {(rank, name): the value it printed}."""
    pooled = run(
        [sys.executable, "-m", "gpupool.cli", "run", "--cuda", *client, "-n", "2", "-p", "0.5", "--",
         *torchrun("collectives.py", 2)],
        clean_env(GPUPOOL_SCHEDULER=pool, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")
    return {(r, name): value for r, name, value in RESULT.findall(pooled.stdout)}


def assert_collectives_give_the_cpu_results(pool: str, client: tuple[str, ...], names: list[str]) -> None:
    """Each of `names` printed the same (repr of lists of Python floats, ints, objects) on both ranks as the same
    script under torchrun on the CPU with gloo."""
    pooled, cpu = beside(lambda: collectives_on_pool(pool, client), torchrun_on_cpu, "collectives.py", 2)
    local = {(r, name): value for r, name, value in RESULT.findall(cpu.stdout)}
    mine = {key: value for key, value in pooled.items() if key[1] in names}
    expected = {key: value for key, value in local.items() if key[1] in names}
    assert {name for _, name in expected} == set(names), local
    assert mine == expected


@pytest.mark.parametrize("client", CLIENTS, ids=["default", "shim"])
def test_reduce_gives_the_cpu_results(pool: str, client: tuple[str, ...]) -> None:
    """`dist.reduce` (sum to rank 1, max and product to rank 0): the destination's tensor equals gloo's. Until round
    38 it was one InvalidArgument ("gather, reduce, send/recv and all-to-all are not implemented")."""
    assert_collectives_give_the_cpu_results(pool, client, ["reduce-sum", "reduce-max", "reduce-product"])


@pytest.mark.parametrize("client", CLIENTS, ids=["default", "shim"])
def test_gather_gives_the_cpu_results(pool: str, client: tuple[str, ...]) -> None:
    """`dist.gather` to rank 0 and (async_op) to rank 1: the destination's list equals gloo's, the other rank's
    `gather_list` stays None. Until round 38 one InvalidArgument."""
    assert_collectives_give_the_cpu_results(pool, client, ["gather-0", "gather-1"])


@pytest.mark.parametrize("client", CLIENTS, ids=["default", "shim"])
def test_object_collectives_give_the_cpu_objects(pool: str, client: tuple[str, ...]) -> None:
    """A config broadcast from rank 0 and from rank 1 (`broadcast_object_list`), metrics of different pickled sizes
    (`all_gather_object`), a dict holding a device tensor, `gather_object` and `scatter_object_list`: the objects equal
    gloo's. torch pickles them in the client's process; the daemons move bytes (uint8 tensors) and unpickle nothing.
    Until round 38 `gather_object` was gather's InvalidArgument, and on the C++ client a device tensor in an object
    failed to pickle ("a tensor on a storage the daemon never saw"); `broadcast_object_list`, `scatter_object_list`
    and `all_gather_object` of plain objects already worked (pinned here)."""
    names = ["broadcast-object-list", "broadcast-object-list-1", "all-gather-object", "all-gather-object-tensor",
             "gather-object", "scatter-object-list"]  # fmt: skip
    assert_collectives_give_the_cpu_results(pool, client, names)


@pytest.mark.parametrize("client", CLIENTS, ids=["default", "shim"])
def test_distributed_checkpoint_save_and_load_plan_over_the_group(pool: str, client: tuple[str, ...]) -> None:
    """torch.distributed.checkpoint's `save` and `load` of a CPU state dict over the group: DCP plans both with
    `gather_object`, `scatter_object_list` and `all_gather_object`; the loaded weights equal gloo's. Until round 38
    `save` failed in its planning: gather's InvalidArgument."""
    assert_collectives_give_the_cpu_results(pool, client, ["dcp-save-load"])


@pytest.mark.parametrize("client", CLIENTS, ids=["default", "shim"])
def test_send_and_recv_between_the_two_ranks_give_the_cpu_results(pool: str, client: tuple[str, ...]) -> None:
    """`send`/`recv` both ways (one `recv` without a source, which reports the sender) and `isend`/`irecv`: in a group
    of two each is a broadcast from the sender. Until round 38 one InvalidArgument."""
    assert_collectives_give_the_cpu_results(pool, client, ["send-recv", "recv-anysource-from", "isend-irecv"])


@pytest.mark.parametrize("client", CLIENTS, ids=["default", "shim"])
def test_fork_rng_on_each_ranks_own_device_gives_the_cpu_draws(pool: str, client: tuple[str, ...]) -> None:
    """`torch.random.fork_rng` in both ranks of a torchrun job under --cuda: `devices=[local_rank]`, `[device]`,
    `[torch.cuda.current_device()]` and no devices (every device it may use): the draws before and inside equal gloo's
    run's on the CPU, and the draw after it repeats the one inside. Until round 44 torch's fork_rng (its device module
    gpupool's, as torch's own code is answered) read the script's CUDA numbers as gpupool's: every case but rank 0's
    first and third failed ("gpupool:1 is lease device 0 here, local rank 0's own device ...", "expected a gpupool
    device"), and `fork_rng()` forked every device of the lease, another rank's own among them (client/rng.py
    `fork_rng`)."""
    names = ["fork-rng-own", "fork-rng-device", "fork-rng-current", "fork-rng-default"]
    assert_collectives_give_the_cpu_results(pool, client, names)


@pytest.mark.parametrize("client", CLIENTS, ids=["default", "shim"])
def test_all_to_all_gives_the_cpu_results(pool: str, client: tuple[str, ...]) -> None:
    """`all_to_all_single` with equal splits, with uneven split sizes (int64 rows, `async_op`), `all_to_all` of a list,
    and torch's functional `all_to_all_single` (DTensor's): each rank's output equals gloo's. Built on allgather
    (client/distributed.py `_all_to_all`). Until round 39 one InvalidArgument ("all-to-all is not implemented")."""
    names = ["all-to-all-single", "all-to-all-single-splits", "all-to-all-list", "all-to-all-functional"]
    assert_collectives_give_the_cpu_results(pool, client, names)


@pytest.mark.parametrize("client", CLIENTS, ids=["default", "shim"])
def test_an_exchange_where_both_ranks_send_first_gives_the_cpu_results(pool: str, client: tuple[str, ...]) -> None:
    """`batch_isend_irecv([isend, irecv])` on both ranks, and two tagged `isend`s received in the other order of tags:
    what each rank received equals gloo's. Until round 39 the exchange was "ranks disagree on a collective broadcast"
    (both ranks' sends first), and tags were ignored (the second case swapped the tensors)."""
    assert_collectives_give_the_cpu_results(pool, client, ["isend-irecv-exchange", "isend-irecv-tags"])


@pytest.mark.parametrize("client", CLIENTS, ids=["default", "shim"])
def test_distributed_checkpoint_of_device_tensors_gives_the_cpu_results(pool: str, client: tuple[str, ...]) -> None:
    """`dcp.save` of a state dict of device tensors (a Linear on the device, a 0-dim step counter) and `dcp.load`
    into device tensors: the loaded values equal gloo's, and they stay on the device. Until round 39 DCP's file
    writer failed ("Tensor must be on CPU" under --cuda)."""
    assert_collectives_give_the_cpu_results(pool, client, ["dcp-device-save-load"])


def free_port() -> str:
    """A port that was free a moment ago, for a script told its MASTER_PORT before it starts (ddp_spawn.py: rank 0's
    TCPStore binds it, the other rank dials it, so port 0 cannot do): its runs retry on EADDRINUSE (`with_a_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def with_a_port(cmd: list[str], env: dict[str, str], *after: str) -> subprocess.CompletedProcess[str]:
    """`run(CMD PORT AFTER...)` with a free port, and again with another where a process took it before rank 0's
    store bound it (torch's DistNetworkError: "EADDRINUSE"). Until round 51 one try: the race failed the test."""
    for _ in range(5):
        done = launch([*cmd, free_port(), *after], env)
        if done.returncode == 0 or "EADDRINUSE" not in done.stderr:
            return checked(cmd, done)
    raise AssertionError(f"{cmd}: every port was taken before rank 0's store bound it:\n{done.stderr[-3000:]}")


WEIGHTS = re.compile(r"^rank (\d) weights (.*)$", re.M)


def test_spawned_ddp_script_with_nccl_and_a_snapshot_gives_the_cpu_losses(pool: str, tmp_path: Path) -> None:
    """ddp_spawn.py (pytorch/examples' ddp-tutorial-series multigpu.py, trimmed): `torch.multiprocessing.spawn`, so no
    LOCAL_RANK; `torch.cuda.set_device(rank)` and `init_process_group("nccl", rank=, world_size=)`. Run for one epoch,
    then again for two, resuming from rank 0's snapshot (`torch.load(map_location=f"cuda:{rank}")`): the losses and
    the final weights of both ranks equal the same script's two epochs on the CPU with gloo, run at once (SGD without
    momentum: the snapshot, the weights and the epoch, is all its state; until round 54 the CPU ran twice too, and
    printed the same). Until round 33 rank 1's group was bound to gpupool:0 while it claimed lease device 1: its daemon
    refused the join."""

    def twice(cmd: list[str], env: dict[str, str], snapshot: Path) -> str:
        return "".join(with_a_port([*cmd, str(epochs)], env, str(snapshot)).stdout for epochs in (1, 2))

    script = [sys.executable, "ddp_spawn.py"]
    pooled, local = beside(
        lambda: twice(
            [sys.executable, "-m", "gpupool.cli", "run", "--cuda", "-n", "2", "-p", "0.5", "--", *script],
            clean_env(GPUPOOL_SCHEDULER=pool, OMP_NUM_THREADS="1"),
            tmp_path / "pool.pt",
        ),
        lambda: with_a_port([*script, "2"], cpu_env(OMP_NUM_THREADS="1"), str(tmp_path / "cpu.pt")).stdout,
    )
    losses, reference = values(LOSS.findall(pooled)), values(LOSS.findall(local))
    assert len(losses) == 8 and len(reference) == 8, pooled + local  # 4 steps, then the resumed epoch's 4
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-7)
    assert sum(losses[4:]) < sum(losses[:4])  # it trained
    resumed = sorted(re.findall(r"^rank (\d) resuming at epoch 1$", pooled, re.M))
    assert resumed == ["0", "1"], pooled  # every rank loaded rank 0's snapshot onto its own device
    weights = {rank: [float(w) for w in ws.split()] for rank, ws in WEIGHTS.findall(pooled)}
    cpu_weights = {rank: [float(w) for w in ws.split()] for rank, ws in WEIGHTS.findall(local)}
    assert sorted(weights) == ["0", "1"] and len(weights["0"]) == 21, pooled
    assert weights["0"] == weights["1"]  # DDP kept the ranks in step
    assert weights["0"] == pytest.approx(cpu_weights["0"], rel=1e-5, abs=1e-6)
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_hogwild_script_sharing_a_cuda_model_between_processes_is_one_clear_error(
    pool: str, client: tuple[str, ...]
) -> None:
    """hogwild.py (pytorch/examples' mnist_hogwild, trimmed) sends its CUDA model to spawned processes, which torch
    does through CUDA IPC. On the pool: one RuntimeError that says what and why (client/mp_share.py), on both clients;
    until round 33 torch's `_share_fd_: only available on CPU` (the C++ client) or `bad value(s) in fds_to_keep`
    (the Python client). On the CPU it trains."""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "--cuda", *client, "-p", "0.5", "--",
           sys.executable, "hogwild.py", "--cuda"]  # fmt: skip
    done = launch(cmd, clean_env(GPUPOOL_SCHEDULER=pool))
    assert done.returncode != 0, done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: a tensor on gpupool:0 cannot be sent to another process"), done.stderr
    assert "CUDA IPC" in last and "not available on a pooled GPU" in last
    assert "trained" not in done.stdout
    assert "hogwild done on cpu" in on_cpu("hogwild.py", "--cuda").stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


WORKERS = """
import torch
from torch.utils.data import DataLoader, TensorDataset
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = torch.nn.Linear(4, 1).to(device)  # a session streams before the workers fork
loader = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=16, num_workers=2, pin_memory=True)
for step, (x,) in enumerate(loader):
    print(f"step {step} loss {model(x.to(device)).pow(2).mean().item():.6f}")
"""


def test_dataloader_workers_fork_without_grpc_log_lines(pool: str) -> None:
    """A DataLoader with worker processes forks them while the client's session streams: gRPC skipped its fork
    handlers and logged `fork_posix.cc:71] Other threads are currently calling into gRPC, skipping fork() handlers`
    once a worker (round 32: mnist, vae, siamese). `gpupool run` gives its child GRPC_ENABLE_FORK_SUPPORT=0 (the
    workers never use gRPC): no such line, the CPU's losses."""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "--cuda", "-p", "0.5", "--", sys.executable, "-c", WORKERS]
    done, local = beside(lambda: run(cmd, clean_env(GPUPOOL_SCHEDULER=pool)), on_cpu, "-c", WORKERS)
    assert "fork" not in done.stderr, done.stderr
    losses = LOSS.findall(done.stdout)
    assert len(losses) == 4, done.stdout
    assert_loss_lines_close(losses, LOSS.findall(local.stdout))
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


DEEPCOPY = """
import copy, dataclasses
import torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 2).cuda()
opt = torch.optim.Adam(model.parameters())
model(torch.randn(3, 4, device="cuda")).sum().backward()
opt.step()
x = torch.arange(6.0, device="cuda").reshape(2, 3).t().requires_grad_()
x.grad = torch.ones(3, 2, device="cuda")
y = copy.deepcopy(x)
assert y.device == x.device and y.tolist() == x.tolist() and y.requires_grad and y.grad.tolist() == x.grad.tolist()
state = copy.deepcopy(opt.state_dict())["state"]
for i, p in enumerate(model.parameters()):
    assert torch.equal(state[i]["exp_avg"].cpu(), opt.state[p]["exp_avg"].cpu())
twin = copy.deepcopy(model)
assert torch.equal(twin.weight.cpu(), model.weight.cpu()) and twin.weight is not model.weight
twin.weight.data.add_(1)
assert not torch.equal(twin.weight.cpu(), model.weight.cpu())  # a copy, not the same daemon tensor


@dataclasses.dataclass
class Snapshot:
    model_state: dict
    optimizer_state: dict


snap = dataclasses.asdict(Snapshot(model.state_dict(), opt.state_dict()))  # deep-copies every tensor
print("deepcopy ok", snap["model_state"]["weight"].device, x.stride(), y.stride())
"""


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_deepcopy_of_device_tensors_and_a_dataclass_snapshot(pool: str, client: tuple[str, ...]) -> None:
    """copy.deepcopy of a device tensor, of an optimizer's state_dict, of a model, and dataclasses.asdict of a
    snapshot (pytorch/examples' minGPT-ddp saves one so): on the C++ client torch's storage copy made a storage the
    daemon never saw ("a tensor on a storage the daemon never saw") until round 33."""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "--cuda", *client, "-p", "0.5", "--", sys.executable, "-c"]
    done = run([*cmd, DEEPCOPY], clean_env(GPUPOOL_SCHEDULER=pool))
    assert "deepcopy ok gpupool:0 (1, 3) (1, 3)" in done.stdout, done.stdout + done.stderr
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


IDIOM = re.compile(r"^step \d+ grad norm (\S+) loss (\S+)$", re.M)
RELOADED = re.compile(r"^reloaded on \S+ eval sum (\S+)$|^eval on the host sums (\S+) (\S+)$", re.M)


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_cuda_idioms_script_gives_the_cpu_losses(pool: str, client: tuple[str, ...]) -> None:
    """cuda_idioms.py: cudnn.benchmark, get_device_properties, a pinned DataLoader with 2 workers and non_blocking
    copies, apex's side-stream prefetcher (`torch.cuda.Stream`, `with torch.cuda.stream(s)`, `wait_stream`,
    `Tensor.record_stream`), a channels_last conv net with gradient accumulation and clip_grad_norm_, timed
    `torch.cuda.Event`s, synchronize, empty_cache, the memory counters: every gradient norm and loss within 1e-5 of
    the CPU's, on both clients. Until round 38 `x.record_stream(torch.cuda.current_stream())` raised torch's "unknown
    parameter type", and, past it, the conv net trained on scrambled activations: the daemon's channels_last conv
    output was read through the contiguous geometry the client computed for `torch.flatten` (step 0's loss 2.459
    against the CPU's 2.724).
    Round 56: the eval outputs copied to a pinned buffer (`torch.empty(..., pin_memory=True)`) and by
    `.to("cpu", non_blocking=True)` (until then torch's "... implement `getPinnedMemoryAllocator` ..." at each), and
    its state_dict reloaded with `map_location=lambda storage, loc: storage.cuda()` (until then torch's
    "torch.UntypedStorage(): Storage device not recognized: cuda") and with `"cuda"`, weights only, give the CPU's
    sums; a block with dropout under torch.utils.checkpoint (reentrant and not) gets the gradients it gets without
    it (until then the C++ client's recomputation drew another mask: torch.gpupool had no `_initialized`)."""
    pooled, local = beside(lambda: on_pool(pool, "cuda_idioms.py", *client, "-p", "0.5"), on_cpu, "cuda_idioms.py")
    steps, reference = IDIOM.findall(pooled.stdout), IDIOM.findall(local.stdout)
    assert len(steps) == 6 and len(reference) == 6, pooled.stdout
    assert [float(v) for s in steps for v in s] == pytest.approx([float(v) for s in reference for v in s], rel=1e-5)
    sums = [float(v) for line in RELOADED.findall(pooled.stdout) for v in line if v]
    local_sums = [float(v) for line in RELOADED.findall(local.stdout) for v in line if v]
    assert len(sums) == 4 and sums == pytest.approx(local_sums, rel=1e-5, abs=1e-6), pooled.stdout
    assert "checkpointed dropout grads equal True" in pooled.stdout, pooled.stdout
    assert "idioms done on cuda" in pooled.stdout and "gpu gpupool fake GPU (CPU) memory 268435456" in pooled.stdout
    assert re.search(r"^epoch 1 took \S+ ms, allocated True$", pooled.stdout, re.M), pooled.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_cuda_idioms_script_with_torch_cuda_amp(pool: str, client: tuple[str, ...]) -> None:
    """cuda_idioms.py --amp: `torch.cuda.amp.autocast()` and `torch.cuda.amp.GradScaler()` (the older spelling) with
    gradient accumulation and `scaler.unscale_` before clip_grad_norm_: float16 on the pool, near the CPU's float32
    losses (AMP is off there), on both clients (their float16 runs print the same lines: checked by hand)."""
    pooled = on_pool(pool, "cuda_idioms.py", *client, "-p", "0.5", script_args=("--amp",))
    steps, reference = IDIOM.findall(pooled.stdout), IDIOM.findall(on_cpu("cuda_idioms.py").stdout)
    assert len(steps) == 6, pooled.stdout
    got, want = [float(v) for s in steps for v in s], [float(v) for s in reference for v in s]
    assert got == pytest.approx(want, rel=2e-3) and got != want  # float16 really ran
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


CONV_VIEWS = """
import torch
import torch.nn.functional as F
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
cases = [(F.conv2d, (2, 3, 5, 5), (4, 3, 3, 3), torch.channels_last, torch.float32),
         (F.conv2d, (2, 3, 5, 5), (4, 3, 3, 3), torch.channels_last, torch.float64),
         (F.conv3d, (1, 2, 3, 4, 4), (3, 2, 2, 2, 2), torch.channels_last_3d, torch.float32),
         (F.conv_transpose2d, (2, 3, 4, 4), (3, 2, 3, 3), torch.channels_last, torch.float32)]
for conv, xs, ws, fmt, dtype in cases:
    for x_fmt, w_fmt in ((fmt, torch.contiguous_format), (torch.contiguous_format, fmt), (fmt, fmt)):
        x = torch.randn(xs, generator=g, dtype=dtype).to(dev).to(memory_format=x_fmt).requires_grad_()
        w = torch.randn(ws, generator=g, dtype=dtype).to(dev).to(memory_format=w_fmt).requires_grad_()
        y = conv(x, w)
        flat = torch.flatten(y, 1)  # a view where the output is contiguous
        (flat * torch.arange(flat.shape[1], dtype=dtype).to(dev)).sum().backward()
        # views of the gradients: x.grad[:, 0] takes its geometry from the layout the client computed
        print("case", conv.__name__, dtype, x_fmt, w_fmt, flat[0, :6].tolist(), x.grad[:, 0].flatten()[:6].tolist(),
              w.grad[:, 0].flatten()[:6].tolist())
"""


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_channels_last_convolutions_and_views_of_them_give_the_cpu_values(pool: str, client: tuple[str, ...]) -> None:
    """conv2d (float32, float64), conv3d and conv_transpose2d with a channels_last input, weight or both: a view of
    the output (`torch.flatten`) and of the gradients (`.view(-1)`) reads the CPU's values. The clients compute a conv's
    output on torch's meta kernel (contiguous) and send views of it as that geometry; the daemon's CPU (and cuDNN)
    kernel returned channels_last, so until round 38 the view read its bytes out of order (server/guards.py
    `_convolution` lays the output out as the meta kernel does; the gradients' layouts already agreed on a fake GPU:
    `_convolution_backward` keeps them so where cuDNN's float64 would not)."""
    _same_lines_pooled_and_local(pool, client, CONV_VIEWS, r"^case .*$", 12)
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def _same_lines_pooled_and_local(
    pool: str, client: tuple[str, ...], code: str, pattern: str, count: int
) -> tuple[str, list[str]]:
    """`python -c CODE` through `gpupool run --cuda CLIENT -p 0.5` and on the CPU: each prints `count` lines that
    match `pattern`, and each pooled line's text before its "[" equals the local run's (strides, layouts, whether a
    view exists), its numbers after it equal within float32 rounding. The pooled stdout and lines, for more checks."""
    done, cpu = beside(lambda: on_pool(pool, "-c", *client, "-p", "0.5", script_args=(code,)), on_cpu, "-c", code)
    pooled, local = done.stdout, cpu.stdout
    got, want = re.findall(pattern, pooled, re.M), re.findall(pattern, local, re.M)
    assert len(got) == count and len(want) == count, pooled
    for line, ref in zip(got, want, strict=True):
        head, ref_head = line.split("[", 1)[0], ref.split("[", 1)[0]
        assert head == ref_head
        nums = [float(v) for v in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", line.partition("[")[2])]
        ref_nums = [float(v) for v in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", ref.partition("[")[2])]
        assert nums == pytest.approx(ref_nums, rel=1e-5, abs=1e-6), (line, ref)
    return pooled, got


CONV_LAYOUT = """
import torch
import torch.nn as nn
import torch.nn.functional as F
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
cl, cl3, plain = torch.channels_last, torch.channels_last_3d, torch.contiguous_format
cases = [(F.conv2d, (2, 3, 5, 5), (4, 3, 3, 3), cl), (F.conv3d, (2, 2, 3, 4, 4), (3, 2, 2, 2, 2), cl3),
         (F.conv_transpose2d, (2, 3, 4, 4), (3, 2, 3, 3), cl)]
for conv, xs, ws, fmt in cases:
    for x_fmt, w_fmt in ((fmt, plain), (plain, fmt), (fmt, fmt), (plain, plain)):
        x = torch.randn(xs, generator=g).to(dev).to(memory_format=x_fmt)
        w = torch.randn(ws, generator=g).to(dev).to(memory_format=w_fmt)
        y = conv(x, w)
        last = y.movedim(1, -1)  # a view: channels last in memory order where y is channels_last
        try:
            flat = last.view(-1)[:5].tolist()  # view(): only where that view is contiguous (y channels_last)
        except RuntimeError:
            flat = "no view"
        print("layout", conv.__name__, x_fmt, w_fmt, y.stride(), y.is_contiguous(memory_format=fmt), flat)
    x64 = torch.randn(xs, generator=g, dtype=torch.float64).to(dev).to(memory_format=fmt)
    print("float64", conv.__name__, conv(x64, torch.randn(ws, generator=g, dtype=torch.float64).to(dev)).stride())
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(8, 4, 1)).to(dev, memory_format=cl)
x = torch.randn(4, 3, 8, 8, generator=g).to(dev, memory_format=cl).requires_grad_()
h = x
for i, layer in enumerate(net):
    h = layer(h)
    print("stage", i, type(layer).__name__, h.stride(), h.is_contiguous(memory_format=cl))
h.square().mean().backward()
print("grads", x.grad.stride(), net[0].weight.grad.stride(), round(x.grad.abs().sum().item(), 4),
      round(net[0].weight.grad.abs().sum().item(), 4))
"""


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_channels_last_convolutions_return_channels_last_as_on_a_gpu(pool: str, client: tuple[str, ...]) -> None:
    """A conv of a channels_last input or weight (conv2d, conv3d, conv_transpose2d, float32) returns channels_last
    (channels_last_3d) on the pool, as cuDNN and the CPU do: the strides, `is_contiguous(memory_format=...)` and a
    `.view()` that exists only for a channels_last output equal the CPU's, as do the layouts of what follows in a
    channels_last net (BatchNorm, ReLU, max pooling, a 1x1 conv) and its gradients; float64 convs are contiguous, as
    cuDNN's (the CPU's are channels_last there). Until round 43 every conv output was contiguous on the pool (the
    daemon copied it so: server/guards.py `_convolution`), `is_contiguous(memory_format=channels_last)` False and the
    view refused ("the `conv_layout` feature", gpupool/protocol.py; docs/cuda.md)."""
    pooled, got = _same_lines_pooled_and_local(pool, client, CONV_LAYOUT, r"^(?:layout|stage) .*$", 17)
    assert "no view" not in "".join(g for g in got if "torch.contiguous_format torch.contiguous_format" not in g)
    assert re.findall(r"^float64 .*$", pooled, re.M) == [
        "float64 conv2d (36, 9, 3, 1)",
        "float64 conv3d (54, 18, 9, 3, 1)",
        "float64 conv_transpose2d (72, 36, 6, 1)",
    ]  # cuDNN's layout for float64: contiguous
    local = on_cpu("-c", CONV_LAYOUT).stdout  # (the run above's, cached)
    grads, ref_grads = re.search(r"^grads .*$", pooled, re.M), re.search(r"^grads .*$", local, re.M)
    assert grads is not None and ref_grads is not None, pooled
    assert grads.group(0).split(")")[:2] == ref_grads.group(0).split(")")[:2]  # the gradients' strides
    assert [float(v) for v in grads.group(0).split(")")[2].split()] == pytest.approx(
        [float(v) for v in ref_grads.group(0).split(")")[2].split()], rel=1e-4
    )
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


RNG_STATE = """
import io
import torch
import torch.nn.functional as F
cuda = torch.cuda.is_available()
dev = "cuda" if cuda else "cpu"
get_state = torch.cuda.get_rng_state if cuda else torch.get_rng_state
set_state = torch.cuda.set_rng_state if cuda else torch.set_rng_state
torch.manual_seed(0)
a = torch.randn(3, device=dev)
with torch.random.fork_rng():  # device_type "cuda": saves the CPU's and cuda:0's generators, restores them after
    b = torch.randn(3, device=dev)
    d = F.dropout(torch.ones(8, device=dev), 0.5)
c = torch.randn(3, device=dev)
print("fork", a.tolist(), b.tolist(), c.tolist(), torch.equal(b, c), d.tolist())
with torch.random.fork_rng(devices=[0] if cuda else []):
    torch.manual_seed(123)
    inner = torch.rand(2, device=dev)
print("seeded inside", inner.tolist(), torch.rand(2, device=dev).tolist())
state = get_state()
x = torch.rand(4, device=dev)
set_state(state)
y = torch.rand(4, device=dev)
print("state", state.dtype, torch.equal(x, y), x.tolist())
buf = io.BytesIO()
torch.save({"cuda": torch.cuda.get_rng_state_all() if cuda else [torch.get_rng_state()]}, buf)
z = torch.rand(2, device=dev)
buf.seek(0)
saved = torch.load(buf)
if cuda:
    torch.cuda.set_rng_state_all(saved["cuda"])
else:
    torch.set_rng_state(saved["cuda"][0])
print("checkpoint", torch.equal(z, torch.rand(2, device=dev)), z.tolist())
try:
    set_state(torch.zeros(3, dtype=torch.uint8))
    torch.rand(1, device=dev).item()
except RuntimeError as exc:
    print("bad state refused", "not a generator state" in str(exc) or str(exc))
print("after", torch.rand(2, device=dev).tolist())
"""


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_fork_rng_and_rng_states_restore_the_generator_as_on_a_gpu(pool: str, client: tuple[str, ...]) -> None:
    """`torch.random.fork_rng()` (device_type "cuda", as torch.utils.checkpoint and sampling code call it),
    `torch.cuda.get_rng_state`/`set_rng_state` and a checkpoint of `get_rng_state_all()` loaded back with
    `set_rng_state_all`: the draws after each restore repeat the ones before, and every drawn value equals the CPU
    run's (a fake GPU's generator is the CPU's, seeded alike); a state of another generator is refused at the next
    sync and the session goes on. Until round 43 fork_rng failed at its entry with "module 'torch.gpupool' has no
    attribute 'get_rng_state'" (torch's "cuda" is gpupool under --cuda) and torch.cuda.get_rng_state was refused
    ("... the generator lives on the daemon"), on both clients."""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "--cuda", *client, "-p", "0.5", "--", sys.executable, "-c"]
    done, cpu = beside(lambda: run([*cmd, RNG_STATE], clean_env(GPUPOOL_SCHEDULER=pool)), on_cpu, "-c", RNG_STATE)
    pooled, local = done.stdout, cpu.stdout
    kinds = ("fork", "seeded inside", "state", "checkpoint")
    got = [line for line in pooled.splitlines() if line.startswith(kinds)]
    want = [line for line in local.splitlines() if line.startswith(kinds)]
    assert len(got) == 4 and len(want) == 4, pooled
    for line, ref in zip(got, want, strict=True):
        assert line.split("[", 1)[0] == ref.split("[", 1)[0] and "False" not in line, (line, ref)
        nums = [float(v) for v in NUMBER.findall(line)]
        assert nums == pytest.approx([float(v) for v in NUMBER.findall(ref)], rel=1e-6), (line, ref)
    assert "bad state refused True" in pooled, pooled  # (the CPU refuses it at once: another message)
    after = re.search(r"^after (.*)$", pooled, re.M)
    assert after is not None and len(after.group(1).split(",")) == 2, pooled
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


DCGAN_STEP = re.compile(r"^step (\d+) D\(x\) (\S+) D\(G\(z\)\) (\S+) (\S+) loss_D (\S+) loss (\S+)$", re.M)


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_dcgan_script_gives_the_cpu_losses(pool: str, client: tuple[str, ...], tmp_path: Path) -> None:
    """dcgan.py (pytorch/examples' dcgan/main.py nearly unmodified: `cudnn.benchmark = True`, `--accel`,
    ConvTranspose2d, BatchNorm2d, LeakyReLU(inplace), BCELoss, two Adams, `label.fill_`, a DataLoader with 2 workers,
    state dicts saved each epoch), with `--channels-last`: D(x), D(G(z)) and both losses of its 4 steps within 1e-5 of
    the CPU's, on both clients, and the saved checkpoint loads back onto the device. It ran so before round 38 too
    (pinned)."""
    script_args = ("--accel", "--channels-last", "--outf", str(tmp_path / "pool"))
    pooled, local = beside(
        lambda: on_pool(pool, "dcgan.py", *client, "-p", "0.5", script_args=script_args),
        on_cpu,
        "dcgan.py",
        "--channels-last",
        "--outf",
        str(tmp_path.parent / "dcgan-cpu"),
    )
    steps, reference = DCGAN_STEP.findall(pooled.stdout), DCGAN_STEP.findall(local.stdout)
    assert len(steps) == 4 and len(reference) == 4, pooled.stdout
    assert [float(v) for s in steps for v in s] == pytest.approx([float(v) for s in reference for v in s], rel=1e-5)
    assert "Using device: cuda" in pooled.stdout and "Using device: cpu" in local.stdout
    assert re.search(r"^checkpoint on cuda True ", pooled.stdout, re.M), pooled.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


EXAMPLE_LINE = re.compile(r"^(?:step|epoch|psnr|upscaled|sample|comparison) .*$", re.M)
NUMBER = re.compile(r"-?\d+\.\d+")


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
@pytest.mark.parametrize(
    ("script", "flags"), [("vae.py", ()), ("super_resolution.py", ("--accel",)), ("style_transfer.py", ())]
)
def test_pytorch_examples_scripts_give_the_cpu_losses(
    pool: str, script: str, flags: tuple[str, ...], client: tuple[str, ...]
) -> None:
    """vae.py, super_resolution.py and style_transfer.py (pytorch/examples, nearly unmodified: the accelerator style, a
    pinned DataLoader with a worker (vae) or 2 (super_resolution), BCE + KL, PixelShuffle, `torch.save(model)` of the
    whole model and its reload; fast_neural_style's ReflectionPad2d, InstanceNorm2d, nearest upsampling, gram matrices,
    `div_` in place and its `eval().cpu()` / `to(device).train()` checkpoint with Adam kept): every printed loss, test
    loss, PSNR and sum within 1e-5 of the CPU's, on both clients. vae and super_resolution ran so before round 38 too
    (pinned); style_transfer was denied `upsample_nearest2d` and `reflection_pad2d` (not on the allowlist) until it."""
    pooled, local = beside(lambda: on_pool(pool, script, *client, "-p", "0.5", script_args=flags), on_cpu, script)
    lines, reference = EXAMPLE_LINE.findall(pooled.stdout), EXAMPLE_LINE.findall(local.stdout)
    assert len(lines) >= 4 and len(lines) == len(reference), pooled.stdout
    assert [NUMBER.sub("#", line) for line in lines] == [NUMBER.sub("#", line) for line in reference]
    got = [float(v) for line in lines for v in NUMBER.findall(line)]
    assert got == pytest.approx([float(v) for line in reference for v in NUMBER.findall(line)], rel=1e-5)
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def assert_checks_and_cpu_losses(pool: str, pooled: subprocess.CompletedProcess[str], script: str, count: int) -> None:
    """A check script's pooled run (amp_sdpa_idioms.py, legacy_types.py, accelerator_api.py): no `FAIL` line, ran to
    `done`, `count` loss lines, the CPU run's losses; then its lease is released."""
    assert "FAIL" not in pooled.stdout, pooled.stdout
    assert pooled.stdout.rstrip().endswith("done"), pooled.stdout
    losses, reference = LOSS.findall(pooled.stdout), LOSS.findall(on_cpu(script).stdout)
    assert len(losses) == count, pooled.stdout
    assert_loss_lines_close(losses, reference)
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_amp_sdpa_idioms_script_runs_as_on_a_gpu(pool: str, client: tuple[str, ...]) -> None:
    """amp_sdpa_idioms.py (round 47): every check holds (no `FAIL` line) and every printed loss is the CPU's, on both
    clients. Until round 47: `torch.is_autocast_enabled("cuda")` was False inside `torch.autocast("cuda")` (and
    `get_autocast_dtype("cuda")` float16 under bfloat16); a `custom_fwd(device_type="cuda", cast_inputs=torch.float32)`
    function cast nothing and failed ("expected m1 and m2 to have the same dtype"); a gradient of a gradient through
    attention under `sdpa_kernel(SDPBackend.MATH)` failed (the fused op has no double backward); `map_location=
    {"cuda:0": "cpu"}` left a device checkpoint on the device; `torch.cuda.memory_stats()` was {} (a KeyError);
    `is_current_stream_capturing()` and `graph_pool_handle()` raised torch's "dummy base class" errors and
    `memory_snapshot()` an AttributeError."""
    pooled = on_pool(pool, "amp_sdpa_idioms.py", *client, "-p", "0.5")
    assert_checks_and_cpu_losses(pool, pooled, "amp_sdpa_idioms.py", 8)


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_legacy_cuda_tensor_types_script_runs_as_on_a_gpu(pool: str, client: tuple[str, ...]) -> None:
    """legacy_types.py (round 49, the PyTorch-GAN style): `Tensor = torch.cuda.FloatTensor`, `Tensor(n, 1).fill_(1.0)`,
    `Tensor(ndarray)`, `imgs.type(Tensor)`, `torch.set_default_tensor_type("torch.cuda.FloatTensor")`, `x.type()`,
    `torch.cuda.initial_seed()`, `torch.cuda.StreamContext`/`set_stream`: every check holds and every loss is the CPU's,
    on both clients. Until round 49 the first `Tensor(...)` failed ("type torch.cuda.FloatTensor not available. Torch
    not compiled with CUDA enabled."), `initial_seed()` with an AttributeError (`_cuda_getDevice`) and `StreamContext`
    with another (`stream_id`)."""
    pooled = on_pool(pool, "legacy_types.py", *client, "-p", "0.5")
    assert_checks_and_cpu_losses(pool, pooled, "legacy_types.py", 9)


@pytest.mark.parametrize(
    "cuda, client", [(True, ()), (True, ("--client", "shim")), (False, ())], ids=["default", "shim", "plain-native"]
)
def test_accelerator_synchronize_and_memory_api_answer_as_on_a_gpu(
    pool: str, cuda: bool, client: tuple[str, ...]
) -> None:
    """accelerator_api.py (round 49): torch.accelerator.synchronize() and its memory API (memory_allocated,
    max_memory_allocated, memory_stats, reset_peak_memory_stats, empty_cache, get_memory_info) answer from the
    session, under `--cuda` on both clients and on the C++ client's plain `gpupool` accelerator; the losses are the
    CPU's. Until round 49 synchronize() raised "Backend doesn't support synchronizing all streams on device." and each
    memory call torch's INTERNAL ASSERT "Allocator for gpupool is not a DeviceAllocator"."""
    pooled = on_pool(pool, "accelerator_api.py", *client, "-p", "0.5", cuda=cuda)
    assert_checks_and_cpu_losses(pool, pooled, "accelerator_api.py", 4)


def test_model_parallel_script_over_cuda_0_and_cuda_1_gives_the_cpu_losses(pool: str) -> None:
    """`gpupool run --cuda -n 2`: one process, layers on cuda:0 and cuda:1 (gpupool:0 and gpupool:1), backward across
    both; the losses of the script on the CPU (a fresh process: within float32 rounding)."""
    pooled, local = beside(
        lambda: on_pool(pool, "model_parallel.py", "-n", "2", "-p", "0.5"), on_cpu, "model_parallel.py"
    )
    losses = LOSS.findall(pooled.stdout)
    assert len(losses) == 6, pooled.stdout + local.stdout
    assert_loss_lines_close(losses, LOSS.findall(local.stdout))
    assert "done on cuda:0 cuda:1" in pooled.stdout and "done on cpu cpu" in local.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


GPUPOOL_SPLIT = """
import gpupool.torch, torch
from torch import nn
print("count", torch.gpupool.device_count())  # both leased devices, before either is attached
torch.manual_seed(0)
l1, l2 = nn.Linear(4, 8).to("gpupool:0"), nn.Linear(8, 1).to("gpupool:1")
opt = torch.optim.SGD([*l1.parameters(), *l2.parameters()], lr=0.1)
x, y = torch.ones(16, 4), torch.zeros(16, 1)
for step in range(3):
    opt.zero_grad()
    loss = nn.functional.mse_loss(l2(torch.relu(l1(x.to("gpupool:0"))).to("gpupool:1")), y.to("gpupool:1"))
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.6f}", l1.weight.grad.device, l2.weight.grad.device)
"""


def test_gpupool_run_two_devices_in_one_process_without_cuda_flag(pool: str) -> None:
    """`gpupool run -n 2 -- python script.py`: torch.gpupool.device_count() is 2 from the start, and a model split
    across gpupool:0 and gpupool:1 trains (its backward crosses both)."""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "-n", "2", "-p", "0.5", "--", sys.executable, "-c"]
    done = run([*cmd, GPUPOOL_SPLIT], clean_env(GPUPOOL_SCHEDULER=pool))
    assert done.stdout.startswith("count 2\n"), done.stdout
    assert done.stdout.count("gpupool:0 gpupool:1") == 3, done.stdout
    cpu_script = GPUPOOL_SPLIT.replace("gpupool.torch, ", "").replace("torch.gpupool.device_count()", "2")
    local = run([sys.executable, "-c", cpu_script.replace('"gpupool:0"', '"cpu"').replace('"gpupool:1"', '"cpu"')],
                clean_env())  # fmt: skip
    losses = values(LOSS.findall(done.stdout.replace(" gpupool:0 gpupool:1", "")))
    # bit for bit even against a fresh CPU process: every tensor here has at most 128 elements, so no op takes a
    # parallel path (ATen's grain is 2048 and more), and one thread on one CPU runs the same kernels in both processes
    assert losses == values(LOSS.findall(local.stdout.replace(" cpu cpu", ""))), done.stdout + local.stdout
    assert len(losses) == 3 and losses[2] < losses[0], done.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def test_torch_cuda_facade_and_refusals_on_a_two_gpu_lease(pool: str) -> None:
    done = run(
        [sys.executable, "-m", "gpupool.cli", "run", "--cuda", "-n", "2", "-p", "0.5", "--",
         sys.executable, "facade_check.py", str(256 * 1024**2)],
        clean_env(GPUPOOL_SCHEDULER=pool),
    )  # fmt: skip
    assert "facade ok" in done.stdout
    # compile: eager (42), rng states (43); cpp_extension's load and (55) load_inline, refused at the script's import
    assert done.stderr.count("not available on a pooled GPU") == 5, done.stderr
    assert done.stderr.count("torch.compile runs eagerly on a pooled GPU") == 1, done.stderr
    assert "(2 leased device(s)" in done.stderr


def test_every_device_form_lands_on_the_pool_on_a_two_gpu_lease(pool: str) -> None:
    """device_forms.py: each form (a factory's device= as string/id/torch.device, *_like, new_*, Tensor.to/.cuda in
    each argument position, Module.to/.cuda/.to_empty, is_cuda, a thread) lands on gpupool:1 for cuda:1."""
    done = on_pool(pool, "device_forms.py", "-n", "2")
    assert "device forms ok 1" in done.stdout, done.stdout


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_without_cuda_flag_torch_is_untouched(pool: str, client: tuple[str, ...]) -> None:
    assert "untouched" in on_pool(pool, "no_cuda.py", *client, cuda=False).stdout
    assert "untouched" in on_cpu("no_cuda.py").stdout


CUDA_WITHOUT_FLAG = """
import sys
import torch
try:
    torch.zeros(1, device="cuda")
except AssertionError:
    print("caught: no hint for an error the script handles", flush=True)
model = torch.nn.Linear(4, 2).to("cuda")  # the first uncaught one
"""
NO_CUDA_HINT = "gpupool run: this script asked for CUDA, which this process does not have"


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_a_cuda_script_without_cuda_flag_gets_one_hint_line(pool: str, client: tuple[str, ...]) -> None:
    """A CUDA script under plain `gpupool run` (no --cuda) dies of torch's own "Torch not compiled with CUDA enabled"
    (a CPU-only torch) as before, exit status 1, and one line after the traceback says to run it with --cuda
    (client/cuda/hint.py); an error the script catches prints none, and the same script outside `gpupool run` none.
    Until round 42 torch's error was all there was."""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", *client, "-p", "0.5", "--", sys.executable, "-c"]
    done = launch([*cmd, CUDA_WITHOUT_FLAG], clean_env(GPUPOOL_SCHEDULER=pool))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "caught: no hint" in done.stdout
    last = done.stderr.rstrip().splitlines()
    assert last[-2] == "AssertionError: Torch not compiled with CUDA enabled", done.stderr
    assert last[-1].startswith(NO_CUDA_HINT) and "gpupool run --cuda" in last[-1]
    assert done.stderr.count(NO_CUDA_HINT) == 1
    local = launch([sys.executable, "-c", CUDA_WITHOUT_FLAG], cpu_env())
    assert local.returncode == 1 and NO_CUDA_HINT not in local.stderr, local.stderr
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


DEVICE_AGNOSTIC = """
import torch
device = "cuda" if torch.cuda.is_available() else "cpu"
model = torch.nn.Linear(4, 2).to(device)
model(torch.ones(3, 4, device=device)).sum().backward()
print("trained on", device, flush=True)
"""
ATTACHES = "import torch, gpupool.torch\nprint(torch.ones(2, device='gpupool:0').sum().item(), flush=True)\n"
UNUSED = "gpupool run: the command attached no session to its lease's GPU(s)"


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_a_command_that_attached_nothing_gets_one_note(pool: str, client: tuple[str, ...]) -> None:
    """A device-agnostic script (`"cuda" if torch.cuda.is_available() else "cpu"`) under plain `gpupool run` trains
    on the local CPU; after it one line says its lease's GPU went unused (run it with --cuda), exit status 0 still.
    A command that attached its device gets none, nor one that failed (its error stays the last line). Until round
    42 the run said nothing: the leased GPU idled."""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", *client, "-p", "0.5", "--", sys.executable, "-c"]
    done = launch([*cmd, DEVICE_AGNOSTIC], clean_env(GPUPOOL_SCHEDULER=pool))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "trained on cpu\n", done.stdout
    last = done.stderr.rstrip().splitlines()
    assert last and last[-1].startswith(UNUSED) and "--cuda" in last[-1], done.stderr
    assert done.stderr.count(UNUSED) == 1, done.stderr
    used = run([*cmd, ATTACHES], clean_env(GPUPOOL_SCHEDULER=pool))
    assert used.stdout == "2.0\n" and UNUSED not in used.stderr, used.stdout + used.stderr
    failed = launch([*cmd, "import sys; sys.exit(3)"], clean_env(GPUPOOL_SCHEDULER=pool))
    assert failed.returncode == 3 and UNUSED not in failed.stderr, failed.stderr
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def test_gpupool_smi_inside_gpupool_run_gets_no_note(pool: str) -> None:
    """`gpupool run -- gpupool smi` (the docs' way for a tenant to see its own sessions under --tls-client-auth none)
    uses its lease's tokens and attaches no session, on purpose: no note after its tables (ops43: it said "whatever
    it ran ran on this machine's CPU: for a CUDA script, run it with --cuda")."""
    smi = [sys.executable, "-m", "gpupool.cli", "smi"]
    done = launch([sys.executable, "-m", "gpupool.cli", "run", "-p", "0.5", "--", *smi],
                  clean_env(GPUPOOL_SCHEDULER=pool, COLUMNS="200"))  # fmt: skip
    assert done.returncode == 0 and "tenants (sessions on the daemons)" in done.stdout, done.stdout + done.stderr
    assert "leases (1 active" in done.stdout and UNUSED not in done.stderr, done.stderr
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def test_gpupool_cuda_env_for_launchers_without_gpupool_run(pool: str) -> None:
    """What torchrun's workers see: $GPUPOOL_CUDA=1 and a scheduler; the shim leases a GPU itself."""
    done = run([sys.executable, "mnist_style.py"], clean_env(GPUPOOL_SCHEDULER=pool, GPUPOOL_CUDA="1"))
    assert LOSS.findall(done.stdout) == LOSS.findall(on_cpu("mnist_style.py").stdout)
    assert "using gpupool fake GPU (CPU) of 1" in done.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the script's own lease to be released at exit")


def test_two_device_lease_on_one_host_keeps_both_sessions_and_release_closes_both(pool: str) -> None:
    """The daemon keys sessions by (lease, device): attaching device 1 must not replace device 0's session."""
    from gpupool.client.pool import lease
    from gpupool.client.session import Session

    from gpupool.errors import GpupoolError

    held = lease(2, 0.25, scheduler=pool)
    assert len({d.host_id for d in held.devices}) == 1 and {d.device for d in held.devices} == {0, 1}
    sessions = [Session.attach(d.address, d.token) for d in held.devices]
    try:
        for s in sessions:
            s.sync()  # both alive
        held.release()

        def both_closed() -> bool:
            closed = 0
            for s in sessions:
                try:
                    s.sync()
                except GpupoolError:
                    closed += 1
            return closed == 2

        wait_until(both_closed, timeout=20, what="the daemon to close both sessions of the released lease")
    finally:
        for s in sessions:
            s.close()


GPT2_LINE = re.compile(r"^(?:step|eval|generated|tied) .*$", re.M)


def gpt2_lines(stdout: str) -> tuple[list[str], list[float]]:
    """gpt2_train.py's lines with their numbers taken out (the generated tokens stay: greedy decoding's argmax), and
    the numbers."""
    lines = GPT2_LINE.findall(stdout)
    return [NUMBER.sub("#", line).replace(" on cuda", " on #") for line in lines], [
        float(v) for line in lines for v in NUMBER.findall(line)
    ]


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_gpt2_style_training_loop_gives_the_cpu_losses(pool: str, client: tuple[str, ...]) -> None:
    """gpt2_train.py (a HuggingFace-style GPT-2 loop, hand-written: Conv1D `addmm`, causal and padding-masked
    `scaled_dot_product_attention`, `gelu(approximate="tanh")`, the LM head tied to the embedding and moved with
    `model.cuda()`, shifted labels with ignore_index, AdamW groups, LambdaLR warmup, gradient accumulation, clip, a
    state_dict reloaded with map_location="cuda", greedy generation): every learning rate, gradient norm, loss, the
    eval loss and the weight sum within 1e-5 of the CPU's and the same generated tokens, on both clients. Until round 39
    the shim failed at the first backward: `logits[..., :-1, :]`'s `slice_backward` was sent whole and denied
    (not on the daemon's allowlist; transfer.py COMPOSITE_HERE)."""
    pooled, local = beside(lambda: on_pool(pool, "gpt2_train.py", *client, "-p", "0.5"), on_cpu, "gpt2_train.py")
    (shape, got), (ref_shape, want) = gpt2_lines(pooled.stdout), gpt2_lines(local.stdout)
    assert len(shape) == 7 and shape == [line.replace(" on cpu", " on #") for line in ref_shape], pooled.stdout
    assert got == pytest.approx(want, rel=1e-5)
    assert "generated" in pooled.stdout and " on cuda" in pooled.stdout and "tied True" in pooled.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def test_gpt2_style_training_loop_with_torch_cuda_amp_fp16_on_the_shim(pool: str) -> None:
    """gpt2_train.py --fp16 (`torch.cuda.amp.autocast()` + `torch.cuda.amp.GradScaler()`, as `Trainer(fp16=True)`) on
    the Python client: float16 attention and matmuls, near the CPU's float32 run (AMP is off there). The C++ client
    prints the same lines (checked by hand, round 39). Denied `slice_backward` until round 39, as above."""
    pooled = on_pool(pool, "gpt2_train.py", "--client", "shim", "-p", "0.5", script_args=("--fp16",))
    (shape, got), (_, want) = gpt2_lines(pooled.stdout), gpt2_lines(on_cpu("gpt2_train.py").stdout)
    assert len(shape) == 7, pooled.stdout
    assert got == pytest.approx(want, rel=2e-3) and got != want  # float16 really ran
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


# mnist_rnn.py with its two nn.Dropout2d layers off (a GPU draws its masks from another stream than the CPU's), the
# script itself unmodified: runpy runs it as `python mnist_rnn.py ARGS` would
NO_DROPOUT2D = (
    "import sys, runpy, torch.nn.functional as F; F.dropout2d = lambda x, p=0.5, training=True, inplace=False: x; "
    "sys.argv = ['mnist_rnn.py', *sys.argv[1:]]; runpy.run_path('mnist_rnn.py', run_name='__main__')"
)
MNIST_LINE = re.compile(r"^(?:Train Epoch|Test set).*$", re.M)


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_mnist_rnn_script_gives_the_cpu_losses(pool: str, client: tuple[str, ...]) -> None:
    """mnist_rnn.py (pytorch/examples' mnist_rnn, `--accel`: `nn.LSTM(batch_first=True)`, BatchNorm1d, Adadelta with
    StepLR, a pinned DataLoader with a worker, eval with argmax/eq/sum) with its Dropout2d layers off: every batch loss
    and the test loss within 1e-5 of the CPU's (bit for bit by hand), on both clients. With the dropout on, both
    clients print the same lines, the device's masks not the CPU's. It ran so before round 39 (pinned)."""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "--cuda", *client, "-p", "0.5", "--", sys.executable, "-c"]
    pooled, local = beside(
        lambda: run([*cmd, NO_DROPOUT2D, "--accel", "--epochs", "1"], clean_env(GPUPOOL_SCHEDULER=pool)),
        on_cpu,
        "-c",
        NO_DROPOUT2D,
        "--epochs",
        "1",
    )
    lines = MNIST_LINE.findall(pooled.stdout)
    reference = MNIST_LINE.findall(local.stdout)
    assert len(lines) == 5 and [NUMBER.sub("#", x) for x in lines] == [NUMBER.sub("#", x) for x in reference]
    got = [float(v) for line in lines for v in NUMBER.findall(line)]
    assert got == pytest.approx([float(v) for line in reference for v in NUMBER.findall(line)], rel=1e-5)
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


SPARSE_REFUSED = "sparse tensors are not available on a pooled GPU (gpupool run --cuda): .to() would put a"


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_gcn_script_with_sparse_tensors_is_one_clear_error(pool: str, client: tuple[str, ...]) -> None:
    """gcn.py (pytorch/examples' gcn, unmodified but for its dataset): load_cora's `features.to_sparse().to(device)`
    is one RuntimeError naming the way out (`.to_dense()`; docs/cuda.md "Refused"), on both clients. Until round 39
    torch's "Could not run 'aten::_sparse_coo_tensor_with_dims_and_tensors' with arguments from the 'Sparsegpupool'
    backend" (C++ client) or "layout torch.sparse_coo is not supported" (shim). (With `.to_dense()` there and
    `--dropout-p 0` it prints the CPU's lines bit for bit: checked by hand, round 39.)"""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "--cuda", *client, "-p", "0.5", "--", sys.executable, "gcn.py"]
    done = launch(cmd, clean_env(GPUPOOL_SCHEDULER=pool))
    assert done.returncode != 0 and done.stderr.count(SPARSE_REFUSED) == 1, done.stderr[-3000:]
    assert "torch.sparse_coo tensor on the gpupool device" in done.stderr and "Sparsegpupool" not in done.stderr
    assert "Using cuda device" in done.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_training_idioms_script_gives_the_cpu_losses(pool: str, client: tuple[str, ...]) -> None:
    """training_idioms.py (weight_norm by both APIs, spectral_norm and orthogonal parametrizations, checkpointing
    reentrant and not, torch.func per-sample gradients, Categorical/Normal/Gamma/Beta distributions with argument
    validation, EMA by `_foreach_lerp_` and AveragedModel, clip_grad_value_, `zero_grad(set_to_none=False)`,
    OneCycleLR, CosineAnnealingWarmRestarts): every printed value within float32 rounding of the CPU's (bit for bit
    here, round 40), on both clients. Until round 40 both clients failed at the first forward (`_weight_norm_interface`
    denied: not on the daemon's allowlist), the shim at `D.Normal` of device tensors (`_is_all_true` denied) and both
    at `Gamma.rsample` (`_standard_gamma`, then the shim's `_standard_gamma_grad`), the shim at `Beta.rsample`
    (`_sample_dirichlet`). Until round 41 forward-mode AD (`jvp`, `jacfwd`, `torch.func.hessian`) failed on both
    clients: `aten::_efficientzerotensor` (a weight's zero tangent) denied (client/zerotensor.py)."""
    pooled, local = beside(
        lambda: on_pool(pool, "training_idioms.py", *client, "-p", "0.5"), on_cpu, "training_idioms.py"
    )
    losses, reference = LOSS.findall(pooled.stdout), LOSS.findall(local.stdout)
    assert len(losses) == 35, pooled.stdout
    assert_loss_lines_close(losses, reference)
    assert "training idioms done on cuda" in pooled.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


AFTER_A_REFUSAL = """
import torch
import torch.nn.functional as F
x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
d = x.cuda()
try:
    a = d.sin() * 3  # ops this process has not sent before, queued: their records define their names
    b = F.fold(d, (2, 4), 2)  # col2im: refused by the daemon (not on its allowlist)
    print("value", (a.sum() + b.sum()).cos().item())  # add and cos, first sent with a failed input
except RuntimeError as e:
    print("refused", "col2im" in str(e))
for what, got, want in (("sin", (d.sin() * 3).cpu(), x.sin() * 3), ("cos", (d + d).cos().cpu(), (x + x).cos())):
    print(what, torch.equal(got, want))
"""


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_a_script_that_catches_a_refusal_goes_on(pool: str, client: tuple[str, ...]) -> None:
    """A refused op, caught by the script: the ops queued with it and after it are the CPU's afterwards, on both
    clients. Until round 40 the daemon lost the definitions of eager records that failed before they ran (an input the
    refused op poisoned), which the client counted as sent: every later use of those ops failed with "eager op id N
    was never defined in this session" (server/executor.py `_eager_op`)."""
    done = on_pool(pool, "-c", *client, "-p", "0.5", script_args=(AFTER_A_REFUSAL,))
    assert done.stdout.split("\n")[:3] == ["refused True", "sin True", "cos True"], done.stdout + done.stderr[-2000:]
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_transformer_eval_loop_gives_the_cpu_values(pool: str, client: tuple[str, ...]) -> None:
    """transformer_eval.py (nn.MultiheadAttention, nn.TransformerEncoder and one TransformerEncoderLayer in `eval()`
    under `torch.no_grad()`, with and without a key padding mask): every printed value within float32 rounding of
    the CPU's, on both clients. Until round 40 torch took its fast path for the gpupool device as for CUDA:
    `_native_multi_head_attention` and `_transformer_encoder_layer_fwd` were denied by the daemon's allowlist, and
    the padding mask's nested tensor failed on both clients (client/fastpath.py: gpupool tensors take the ordinary
    path). Until round 41 an encoder's padded positions held the ordinary path's attention values where torch's
    nested-tensor path (CPU, and CUDA in eval under no_grad) writes zeros before the final norm (the "whole" lines:
    client/fastpath.py `_encoder_padded`)."""
    pooled, local = beside(
        lambda: on_pool(pool, "transformer_eval.py", *client, "-p", "0.5"), on_cpu, "transformer_eval.py"
    )
    losses, reference = LOSS.findall(pooled.stdout), LOSS.findall(local.stdout)
    assert len(losses) == 14, pooled.stdout + pooled.stderr[-2000:]
    assert_loss_lines_close(losses, reference)
    assert "transformer eval done on cuda" in pooled.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


@pytest.mark.parametrize(
    "client,amp",
    [((), False), (("--client", "shim"), False), ((), True)],
    ids=["default", "shim", "default-amp"],
)
def test_resnet_rnn_script_gives_the_cpu_losses(pool: str, client: tuple[str, ...], amp: bool) -> None:
    """resnet_rnn.py (a torchvision-style ResNet with BatchNorm switched between train() and eval(), evaluated under
    `torch.inference_mode()`, a checkpointed block, SGD nesterov, label smoothing, clip_grad_norm_, MultiStepLR; a
    bidirectional GRU over pack_padded_sequence and an LSTM with proj_size; a WGAN-GP gradient penalty; a
    setup_context-style autograd.Function): every printed value within float32 rounding of the CPU's (bit for bit here,
    round 41), on both clients; `--amp` (autocast float16 + torch.amp.GradScaler("cuda")) within 2e-3 of the CPU's
    float32 (the shim prints the same lines: checked by hand). The C++ client ran it so before round 41 (pinned); the
    shim failed at the first view under inference mode ("Cannot set version_counter for inference tensor":
    client/torch/dispatch.py `_outside_inference`), then at pack_padded_sequence (its CPU lengths made meta) and
    at F.affine_grid (`affine_grid_generator` sent whole, denied: client/torch/transfer.py COMPOSITE_HERE)."""
    flags = ("--amp",) if amp else ()
    pooled, local = beside(
        lambda: on_pool(pool, "resnet_rnn.py", *client, "-p", "0.5", script_args=flags), on_cpu, "resnet_rnn.py"
    )
    losses, reference = LOSS.findall(pooled.stdout), LOSS.findall(local.stdout)
    assert len(losses) == 37, pooled.stdout + pooled.stderr[-2000:]
    if amp:
        got, want = values(losses), values(reference)
        assert got == pytest.approx(want, rel=2e-3) and got != want  # float16 really ran
    else:
        assert_loss_lines_close(losses, reference)
    assert "resnet rnn done on cuda" in pooled.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


@pytest.mark.parametrize(
    "client,amp",
    [((), False), (("--client", "shim"), False), ((), True)],
    ids=["default", "shim", "default-amp"],
)
def test_channels_last_amp_script_gives_the_cpu_losses(pool: str, client: tuple[str, ...], amp: bool) -> None:
    """channels_last_amp.py (a timm/NVIDIA-style image classifier: cudnn/TF32 switches, set_per_process_memory_fraction,
    a pinned 2-worker DataLoader whose collate returns channels_last batches, `.to(device, memory_format=
    channels_last)`, `torch.compile(model)`, fused AdamW, warmup + cosine SequentialLR, an EMA AveragedModel, NVTX
    ranges, Event timing, inference_mode eval): every printed value within float32 rounding of the CPU's, on both
    clients (until round 43 the conv outputs were contiguous on the pool, channels_last on the CPU, which moved the
    last digit of some: docs/cuda.md Known limits); `--amp` (autocast float16 + GradScaler): the losses within 1e-3
    of the CPU's float32, the gradient norms within 3e-2. The script asserts the layouts: each uploaded batch and the
    parameters stay channels_last, an eval activation's `.cpu()` too. Until round 42 it stopped at `torch.compile`
    (refused), past that at NVTX's "NVTX functions not installed" and `set_per_process_memory_fraction`
    (AttributeError), and on the shim at its first batch's layout (uploaded contiguous)."""
    flags = ("--amp",) if amp else ()
    pooled, local = beside(
        lambda: on_pool(pool, "channels_last_amp.py", *client, "-p", "0.5", script_args=flags),
        on_cpu,
        "channels_last_amp.py",
    )
    losses, reference = LOSS.findall(pooled.stdout), LOSS.findall(local.stdout)
    assert len(losses) == 33 and len(reference) == 33, pooled.stdout + pooled.stderr[-2000:]
    if amp:  # the losses within 1e-3 (measured: 3e-4), the float16 gradients' norms within 3e-2 (measured: 1.5e-2)
        norms = [i for i, line in enumerate(reference) if " grad norm " in line]
        got, want = values(losses), values(reference)
        assert [got[i] for i in norms] == pytest.approx([want[i] for i in norms], rel=3e-2)
        rest = [i for i in range(len(got)) if i not in norms]
        assert [got[i] for i in rest] == pytest.approx([want[i] for i in rest], rel=1e-3)
        assert got != want  # float16 really ran
    else:
        assert_loss_lines_close(losses, reference)
    assert "channels_last amp done on cuda" in pooled.stdout and "compiled Net" in pooled.stdout
    assert pooled.stderr.count("torch.compile runs eagerly on a pooled GPU") == 1, pooled.stderr
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


INFERENCE_VIEWS = """
import torch
dev = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.arange(12.0).view(4, 3).to(dev)
for _ in range(3):  # (the second and third time from the meta cache: the shim's C path)
    with torch.inference_mode():
        views = [x.t(), x.unsqueeze(0), x[1:], x.view(12), x.detach(), x.split(2)[1], x.unbind(0)[2], x.expand(2, 4, 3)]
        new = x * 2
        later = [new.t(), new[0]]
        print([v.is_inference() for v in views], new.is_inference(), [v.is_inference() for v in later],
              [float(v.sum()) for v in views + later])
    print("outside", float((views[0] + 1).sum()), views[0].requires_grad)
"""


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_views_under_inference_mode_are_the_cpus(pool: str, client: tuple[str, ...]) -> None:
    """Views of a normal device tensor under `torch.inference_mode()` are normal tensors, views of a tensor made there
    inference tensors, with the CPU's values, on both clients, repeatedly. Until round 41 every view of a normal
    tensor failed on the shim ("Cannot set version_counter for inference tensor": its view wrappers were made in
    inference mode, as inference tensors; client/torch/dispatch.py `_outside_inference`, native_ops.cpp)."""
    done = on_pool(pool, "-c", *client, "-p", "0.5", script_args=(INFERENCE_VIEWS,))
    assert done.stdout == on_cpu("-c", INFERENCE_VIEWS).stdout, done.stdout + done.stderr[-2000:]
    assert done.stdout.count("[False, False, False, False, False, False, False, False] True [True, True]") == 3
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def test_rotary_embeddings_and_conjugates_give_the_cpu_values(pool: str) -> None:
    """rotary.py (Llama's `apply_rotary_emb`: `view_as_complex`, a product with `torch.polar` frequencies,
    `view_as_real`, trained; `.view(torch.int32)`, a write through `view_as_real`, `.conj()` resolved, multiplied,
    matrix-multiplied, `.conj().imag`) on the C++ client: every loss and value equal to the CPU's. Until round 48 the
    C++ client gave a view the dtype of its input (`view_as_complex` a float32 tensor of the float pairs; the script
    died: "view_as_real does not support automatic differentiation for outputs with complex dtype"), refused any op on
    a view of another dtype than its storage's, and dropped the conjugate and negative bits (`a * b.conj()` computed
    `a * b`: a rotary model's gradients were wrong). (The Python client ran it right before.)"""
    pooled, local = beside(lambda: on_pool(pool, "rotary.py", "-p", "0.5"), on_cpu, "rotary.py")
    assert pooled.stdout.rstrip().endswith("done"), pooled.stdout + pooled.stderr[-3000:]
    losses = LOSS.findall(pooled.stdout)
    assert len(losses) == 4, pooled.stdout
    assert_loss_lines_close(losses, LOSS.findall(local.stdout))
    rest = [line for line in pooled.stdout.splitlines() if not LOSS.match(line)]
    assert rest == [line for line in local.stdout.splitlines() if not LOSS.match(line)], pooled.stdout + local.stdout
    assert "complex torch.complex64" in pooled.stdout and "bits torch.int32 [1065353216, -1073741824]" in pooled.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_tensor_parallel_attention_gives_the_unsharded_cpu_losses(pool: str, client: tuple[str, ...]) -> None:
    """tp_attention.py (fsdp_tp_example.py's Llama attention in small: heads sharded over a two-rank "tp" mesh,
    rotary embeddings on DTensors, `scaled_dot_product_attention(is_causal=True)`, AdamW foreach) under `gpupool run
    --cuda -n 2 -- torchrun`, both clients: every rank's losses and full weights within float32 rounding of the
    unsharded block trained on the CPU. Until round 48 both failed in DTensor: "Operator aten.
    _scaled_dot_product_fused_attention_overrideable.default does not have a sharding strategy registered"."""
    pooled, local = two_ranks_and_cpu(pool, "tp_attention.py", client)
    steps, reference = sorted(TP_STEP.findall(pooled.stdout)), sorted(TP_STEP.findall(local.stdout))
    assert len(steps) == 6, pooled.stdout
    assert_loss_lines_close(steps, reference)
    weights = sorted(re.findall(r"^rank \d weights .*$", pooled.stdout, re.M))
    cpu_weights = sorted(re.findall(r"^rank \d weights .*$", local.stdout, re.M))
    assert len(weights) == 2 and weights[0].split(" ", 2)[2] == weights[1].split(" ", 2)[2], pooled.stdout
    got, want = (re.findall(r"-?\d+\.\d+", lines[0].split(" ", 2)[2]) for lines in (weights, cpu_weights))
    assert [float(v) for v in got] == pytest.approx([float(v) for v in want], abs=2e-5), (weights, cpu_weights)
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_sdpa_kernel_without_math_fails_where_a_gpu_has_no_kernel(pool: str, client: tuple[str, ...]) -> None:
    """sdpa_no_kernel.py: with `sdpa_kernel` leaving the math backend out, a call no enabled fused kernel of a GPU
    takes (flash with float32 or a mask, 3-D inputs, no backend at all) raises torch's "No available kernel. Aborting
    execution." as on a GPU, on both clients; a call one takes runs (equal to the math path's sum). Until round 48 all
    of them ran on the math path. Round 49: grouped-query attention where only the memory-efficient kernel is enabled
    (which takes no GQA on a GPU) fails too, flash's GQA runs; attn_mask with is_causal runs (torch's math path, where
    the clients sent it until round 49, refuses the pair)."""
    out = on_pool(pool, "sdpa_no_kernel.py", *client, "-p", "0.5").stdout
    ran = dict(re.findall(r"^(.+) ran (\S+)$", out, re.M))
    failed = re.findall(r"^(.+) error (.*)$", out, re.M)
    assert set(ran) == {"flash float16", "efficient float32 mask", "math", "flash float16 gqa",
                        "flash float16 repeated", "efficient mask causal", "causal"}, out  # fmt: skip
    assert [name for name, _ in failed] == ["flash float32", "flash mask", "efficient 3-D", "no backend",
                                            "efficient gqa"], out  # fmt: skip
    assert all(why.startswith("No available kernel. Aborting execution.") for _, why in failed), out
    assert float(ran["efficient float32 mask"]) == pytest.approx(float(ran["math"]), abs=2e-4), out  # an all-True mask
    # attn_mask (all True) with is_causal: the causal call's values (until round 49 torch's math path refused the pair);
    # GQA: the values of the same call with the key/value head repeated
    assert float(ran["efficient mask causal"]) == pytest.approx(float(ran["causal"]), abs=2e-4), out
    assert float(ran["flash float16 gqa"]) == pytest.approx(float(ran["flash float16 repeated"]), abs=2e-3), out
    assert out.rstrip().endswith("done"), out
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


OOM_LINE = re.compile(r"^epoch \d rows \d+ out of memory, grad kept \S+$", re.M)


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_a_caught_out_of_memory_leaves_the_grads_as_they_were(pool: str, client: tuple[str, ...]) -> None:
    """oom_retry.py: a batch of 2^34 rows (4 TiB) raises torch.cuda.OutOfMemoryError at `torch.randn(..., device=)`,
    before its backward, as on a GPU; the script goes on with smaller batches without `zero_grad`, and every loss and
    the trained weights are the CPU run's (which raises the error itself), on both clients. Until round 50 the daemon
    refused the tensor at the next sync, after the backward had run on it: the first `.grad` of each parameter was a
    tensor with no value, and every later backward (adding to it) failed with the first refusal again."""
    pooled, local = beside(lambda: on_pool(pool, "oom_retry.py", *client, "-p", "0.5"), on_cpu, "oom_retry.py")
    expected = [f"epoch {e} rows {1 << 34} out of memory, grad kept False" for e in (0, 1)]
    assert_skipped_as_on_the_cpu(pooled, local, OOM_LINE, expected, 4, "weight")
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def assert_skipped_as_on_the_cpu(
    pooled: subprocess.CompletedProcess[str],
    local: subprocess.CompletedProcess[str],
    caught: re.Pattern[str],
    expected: list[str],
    losses: int,
    weights: str,
) -> None:
    """The lines of the errors a script caught (`caught`) are `expected` in its pooled run and its CPU run; its
    `losses` losses and the list it prints after `weights` are the CPU run's, within float32 rounding."""
    assert caught.findall(pooled.stdout) == caught.findall(local.stdout) == expected, pooled.stdout
    got = LOSS.findall(pooled.stdout)
    assert len(got) == losses, pooled.stdout
    assert_loss_lines_close(got, LOSS.findall(local.stdout))
    printed = [re.findall(rf"^{weights} (.*)$", run.stdout, re.M) for run in (pooled, local)]
    assert pytest.approx(eval_list(printed[0][0]), abs=2e-6) == eval_list(printed[1][0]), printed


def eval_list(text: str) -> list[float]:
    """A printed list of floats ("[0.1, -2.0]")."""
    return [float(v) for v in text.strip("[]").split(",")]


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_a_refusal_within_the_quota_leaves_no_grad_without_a_value(pool: str, client: tuple[str, ...]) -> None:
    """oom_retry.py fits: a batch of 3/4 of the lease's memory fits, the step's activations do not: the daemon refuses
    one (the forward's `square`), and the script hears of it at its `loss.item()`, after the backward has set every
    `.grad` to a tensor with no value. That sync sets them back to None (the daemon's error names the handles without
    a value: client/torch/errors.py `clear_grads`), so the next (small) batch trains, without `zero_grad`, on both
    clients, as on a GPU (which raises at the allocation). Until round 51 its backward added to those and met the same
    refusal (round 50: which said so and named `zero_grad`)."""
    out = on_pool(pool, "oom_retry.py", *client, "-p", "0.5", script_args=("fits",)).stdout
    caught = dict(re.findall(r"^(large|small) caught (.*)$", out, re.M))
    assert set(caught) == {"large"}, out
    assert "memory quota exceeded" in caught["large"] and "zero_grad" not in caught["large"], out
    assert re.search(r"^small loss \d", out, re.M), out
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


@pytest.fixture(scope="module")
def small_worker_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`gpupool up` with two fake GPUs of 512 MiB whose session workers may hold 128 MiB of host memory
    (`--worker-memory`, as $GPUPOOL_WORKER_MEMORY): a fake GPU's memory is its worker's, so a lease of half a GPU
    (a 256 MiB quota) has less free than its quota, as a real GPU's lease has where other processes or the caching
    allocator's blocks hold the device. The scheduler's address."""
    with gpupool_up(
        tmp_path_factory.mktemp("small-workers"), "--fake-gpus", "2", "--fake-gpu-memory", "512MiB",
        env={"GPUPOOL_WORKER_MEMORY": "128MiB"},
    ) as env:  # fmt: skip
        yield env["GPUPOOL_SCHEDULER"]


SKIPPED = re.compile(r"^epoch \d batch \d out of memory, grads None .*$", re.M)


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_a_batch_within_the_quota_but_not_the_free_memory_is_skipped_as_on_a_gpu(
    small_worker_pool: str, client: tuple[str, ...]
) -> None:
    """oom_skip.py: a batch of 192 MiB made on the device fits the lease's 256 MiB quota (no OutOfMemoryError at the
    call: round 50's refusal is for a tensor over the whole quota) but not the device's free memory (its worker's 128
    MiB): the daemon refuses it ("device out of memory") and the script hears of it at its `loss.item()`, after the
    backward ran on the tensor with no value. It catches torch.cuda.OutOfMemoryError and goes on with the next batch,
    once doing nothing else (the gradients accumulate), once with `zero_grad(set_to_none=False)`, both times before
    any gradient was made: every `.grad` is None in the handler, and every loss and the trained weights are the CPU
    run's, which skips that batch (raising the GPU's error itself), on both clients. Until round 51 the backward left
    each `.grad` a tensor with no value, which the next batch's backward added to (and `zero_grad(set_to_none=False)`
    zeroed in place): every later step, and the final read of the weights, raised the first refusal again."""
    rows = str(192 * 1024**2 // 256)
    pooled, local = beside(
        lambda: on_pool(small_worker_pool, "oom_skip.py", *client, "-p", "0.5", script_args=(rows,)),
        on_cpu,
        "oom_skip.py",
        rows,
    )
    expected = [f"epoch {e} batch 0 out of memory, grads None [True, True, True, True]" for e in (0, 1)]
    assert_skipped_as_on_the_cpu(pooled, local, SKIPPED, expected, 6, "weights")
    wait_until(lambda: no_leases(small_worker_pool), timeout=10, what="the run's lease to be released")


HELD = re.compile(r"^epoch \d batch \d out of memory at \S+$", re.M)


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_a_batch_past_the_quota_beside_held_tensors_is_refused_at_the_call(pool: str, client: tuple[str, ...]) -> None:
    """oom_held.py: the script holds 5/8 of its lease's memory; a batch of half of it (within the quota by itself: no
    round-50 refusal) made on the device is refused by the daemon's quota, and the client, whose count of the
    session's bytes passed the quota there, syncs at that call (reserve52): torch.cuda.OutOfMemoryError comes out of
    `torch.randn(..., device=)`, before the forward, the backward and SGD's step, as on a GPU. Every loss and the
    trained weights are the CPU run's, which skips that batch, on both clients. Until round 52 the refusal came at
    the `loss.item()` after `opt.step()`: that step had made SGD's momentum buffers from gradients without a value,
    and the run went wrong from there."""
    pooled, local = beside(lambda: on_pool(pool, "oom_held.py", *client, "-p", "0.25"), on_cpu, "oom_held.py")
    expected = [f"epoch {e} batch 0 out of memory at batch" for e in (0, 1)]
    assert_skipped_as_on_the_cpu(pooled, local, HELD, expected, 6, "weights")
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


@pytest.mark.parametrize("client", [(), ("--client", "shim")], ids=["default", "shim"])
def test_a_cuda_generator_draws_from_its_own_seed(pool: str, client: tuple[str, ...]) -> None:
    """device_generator.py: `torch.Generator(device="cuda")` under --cuda, seeded, handed to randn, rand, randint,
    randperm, bernoulli(_), multinomial and nn.init, its state saved and loaded, deep-copied: what it draws is
    reproducible from its seed, independent of `torch.manual_seed`, and (the client draws it on its CPU) the CPU run's
    numbers, on both clients; its `.device` is the device's, as a tensor's. Until round 50 its construction failed
    ("Cannot get CUDA generator without ATen_cuda library"), and the shim refused any generator an op was given
    ("cannot send an argument of type Generator")."""
    done, cpu = beside(
        lambda: on_pool(pool, "device_generator.py", *client, "-p", "0.5"), on_cpu, "device_generator.py"
    )
    pooled, local = done.stdout.splitlines(), cpu.stdout.splitlines()
    assert pooled[:-1] == local[:-1] and len(local) == 12, (pooled, local)
    assert "same again True default differs True" in local[0] and local[-1] == "generator on cpu", local
    assert pooled[-1] == "generator on gpupool:0", pooled
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def test_a_gpupool_generator_on_the_cpp_client_without_cuda(pool: str) -> None:
    """`torch.Generator("gpupool")` on the C++ client (`gpupool run`'s default, no --cuda): the CPU run's numbers, as
    above. Until round 50 torch refused it ("register `PrivateUse1HooksInterface` ... `getNewGenerator`")."""
    done = on_pool(pool, "device_generator.py", "-p", "0.5", cuda=False, script_args=("gpupool",))
    pooled, local = done.stdout.splitlines(), on_cpu("device_generator.py").stdout.splitlines()
    assert pooled[:-1] == local[:-1] and pooled[-1] == "generator on gpupool:0", (pooled, local)
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")
