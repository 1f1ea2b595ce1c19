"""The collectives a training script uses beyond DDP's, written as for NCCL: `reduce` and `gather` of tensors,
rank 0 broadcasting a config (`broadcast_object_list`), metrics gathered with `all_gather_object` (a dict holding a
device tensor among them) and `gather_object`, `scatter_object_list`, `send`/`recv`/`isend`/`irecv` between the two
ranks, a `torch.distributed.checkpoint` save and load (which plan with the object collectives), and
`torch.random.fork_rng` on each rank's device. Each result is one line `rank R NAME VALUE`. Falls back to gloo on the
CPU when there is no GPU.

    torchrun --standalone --nproc-per-node 2 collectives.py
"""

import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp


def main():
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = torch.device("cpu")
    lines = []

    def out(name, value):
        lines.append(f"rank {rank} {name} {value}")

    # reduce: only the destination's result is defined (gloo leaves partial sums elsewhere)
    t = torch.arange(6.0, device=device).view(2, 3) * (rank + 1) + 0.5
    dist.reduce(t, dst=1)
    if rank == 1:
        out("reduce-sum", t.tolist())
    m = torch.tensor([3, -1, 7], device=device) * (1 - 2 * rank)
    dist.reduce(m, dst=0, op=dist.ReduceOp.MAX)
    if rank == 0:
        out("reduce-max", m.tolist())
    avg = torch.tensor([1.0, 2.0], dtype=torch.float64, device=device) * (rank + 3)
    dist.reduce(avg, dst=0, op=dist.ReduceOp.PRODUCT)
    if rank == 0:
        out("reduce-product", avg.tolist())

    # gather: a list on the destination only
    x = torch.arange(4, device=device).view(2, 2) + 10 * rank
    gathered = [torch.empty_like(x) for _ in range(world)] if rank == 0 else None
    dist.gather(x, gathered, dst=0)
    out("gather-0", None if gathered is None else [g.tolist() for g in gathered])
    y = torch.full((3,), float(rank), device=device).sin()
    gathered = [torch.zeros(3, device=device) for _ in range(world)] if rank == 1 else None
    work = dist.gather(y, gathered, dst=1, async_op=True)
    work.wait()
    out("gather-1", None if gathered is None else [g.tolist() for g in gathered])

    # objects: a config from rank 0, metrics from every rank
    config = [{"lr": 0.1, "layers": [64, 64], "name": "run-7"}, ["<pad>", "<unk>", "the", "a"]]
    received = config if rank == 0 else [None, None]
    dist.broadcast_object_list(received, src=0)
    out("broadcast-object-list", received)
    received = [{"seed": 1234 + rank}] if rank == 1 else [None]
    dist.broadcast_object_list(received, src=1)
    out("broadcast-object-list-1", received)
    metrics = {"rank": rank, "loss": 0.25 * (rank + 1), "tag": "x" * (100 * rank + 1)}
    everyone = [None] * world
    dist.all_gather_object(everyone, metrics)
    out("all-gather-object", everyone)
    loss = torch.tensor([1.5, 2.5], device=device) * (rank + 1)
    everyone = [None] * world
    dist.all_gather_object(everyone, {"rank": rank, "loss": loss})
    out("all-gather-object-tensor", [(o["rank"], o["loss"].tolist()) for o in everyone])
    collected = [None] * world if rank == 0 else None
    dist.gather_object(("accuracy", rank, 0.5 + rank / 4), collected, dst=0)
    out("gather-object", collected)
    mine = [None]
    dist.scatter_object_list(
        mine, [{"shard": i, "files": list(range(i + 2))} for i in range(world)] if rank == 0 else None, src=0
    )
    out("scatter-object-list", mine)

    # point to point between the two ranks
    z = torch.arange(5.0, device=device) if rank == 0 else torch.zeros(5, device=device)
    if rank == 0:
        dist.send(z, dst=1)
    else:
        dist.recv(z, src=0)
    z = z * 2 + rank
    if rank == 1:
        dist.send(z, dst=0)
    else:
        sender = dist.recv(z)  # from any source
        out("recv-anysource-from", sender)
    out("send-recv", z.tolist())
    w = torch.full((2, 2), float(rank + 1), device=device)
    request = dist.isend(w, dst=1) if rank == 0 else dist.irecv(w, src=0)
    request.wait()
    out("isend-irecv", w.tolist())

    # all-to-all (MoE token routing, sequence parallelism): equal splits, uneven splits, a list of tensors (gloo's:
    # of one size), and torch's functional collective (DTensor's, Ulysses-style attention)
    x = torch.arange(8.0, device=device).view(4, 2) + 100 * rank
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x)
    out("all-to-all-single", y.tolist())
    sends = [[1, 2], [3, 1]][rank]  # rank 0 sends 1 row to itself, 2 to rank 1; rank 1 sends 3 to rank 0, 1 to itself
    gets = [[1, 3], [2, 1]][rank]
    x = (torch.arange(sum(sends) * 3, device=device).view(-1, 3) + 10 * rank).to(torch.int64)
    y = torch.zeros(sum(gets), 3, dtype=torch.int64, device=device)
    work = dist.all_to_all_single(y, x, output_split_sizes=gets, input_split_sizes=sends, async_op=True)
    work.wait()
    out("all-to-all-single-splits", y.tolist())
    ins = [
        torch.full((2, 2), float(10 * rank + k), device=device) + torch.arange(2.0, device=device) for k in range(world)
    ]
    outs = [torch.zeros(2, 2, device=device) for _ in range(world)]
    dist.all_to_all(outs, ins)
    out("all-to-all-list", [o.tolist() for o in outs])
    import torch.distributed._functional_collectives as funcol

    x = torch.arange(6.0, device=device).view(3, 2) * (rank + 1)
    y = funcol.all_to_all_single(x, [1, 2] if rank == 0 else [2, 1], [1, 2] if rank == 0 else [2, 1], dist.group.WORLD)
    out("all-to-all-functional", funcol.wait_tensor(y).tolist())

    # both ranks send and receive at once (batch_isend_irecv, each rank's isend first), and tags out of order
    mine = torch.arange(3.0, device=device) + 10 * rank
    theirs = torch.zeros(3, device=device)
    peer = 1 - rank
    for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, mine, peer), dist.P2POp(dist.irecv, theirs, peer)]):
        request.wait()
    out("isend-irecv-exchange", theirs.tolist())
    a, b = torch.full((2,), 1.0 + rank, device=device), torch.full((2,), 5.0 + rank, device=device)
    if rank == 0:
        requests = [dist.isend(a, dst=1, tag=1), dist.isend(b, dst=1, tag=2)]
    else:
        requests = [dist.irecv(b, src=0, tag=2), dist.irecv(a, src=0, tag=1)]
    for request in requests:
        request.wait()
    out("isend-irecv-tags", [a.tolist(), b.tolist()])

    # torch's own checkpoint code: DCP plans a save and a load with gather_object, scatter_object_list and
    # all_gather_object (a state dict on the CPU here: DCP's file writer itself is not the group's business)
    where = [tempfile.mkdtemp(prefix="dcp-") if rank == 0 else None]
    dist.broadcast_object_list(where, src=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    dcp.save({"model": model.state_dict()}, checkpoint_id=where[0])
    fresh = torch.nn.Linear(4, 3)
    state = {"model": {k: torch.zeros_like(v) for k, v in fresh.state_dict().items()}}
    dcp.load(state, checkpoint_id=where[0])
    out("dcp-save-load", [round(v.sum().item(), 6) for v in state["model"].values()])
    # and of the device's tensors (a model trained on the GPU, saved as it is; loaded into device tensors)
    where_device = [tempfile.mkdtemp(prefix="dcp-device-") if rank == 0 else None]
    dist.broadcast_object_list(where_device, src=0)
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3).to(device)
    with torch.no_grad():
        model.weight.mul_(rank + 1)  # each rank saves what it holds: rank 0's replica is the checkpoint's
    dcp.save({"model": model.state_dict(), "step": torch.tensor(7, device=device)}, checkpoint_id=where_device[0])
    fresh = torch.nn.Linear(4, 3).to(device)
    state = {"model": {k: torch.zeros_like(v) for k, v in fresh.state_dict().items()},
             "step": torch.zeros((), dtype=torch.int64, device=device)}  # fmt: skip
    dcp.load(state, checkpoint_id=where_device[0])
    fresh.load_state_dict(state["model"])
    loaded = [round(v.sum().item(), 6) for v in state["model"].values()] + [state["step"].item()]
    out("dcp-device-save-load", [loaded, fresh.weight.device == torch.empty(0, device=device).device])

    # torch.random.fork_rng in each rank, on its own device (dropout, sampling and checkpointing code fork it): the
    # draws inside are undone after it, each draw equal to the CPU's (a fake GPU's generator is the CPU's)
    def forked(name, devices):
        torch.manual_seed(20 + rank)
        try:
            a = torch.randn(2, device=device)
            with torch.random.fork_rng(devices=devices):
                b = torch.randn(2, device=device)
            c = torch.randn(2, device=device)
            out(name, [a.tolist(), b.tolist(), torch.equal(b, c)])
        except Exception as exc:  # one line, so that the other results still print
            out(name, f"refused {type(exc).__name__}: {str(exc).splitlines()[0]}")

    forked("fork-rng-own", [local_rank] if use_cuda else [])
    forked("fork-rng-device", [device] if use_cuda else [])
    forked("fork-rng-current", [torch.cuda.current_device()] if use_cuda else [])
    forked("fork-rng-default", None)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(where[0])
        shutil.rmtree(where_device[0])
    print("\n".join(lines) + "\n", end="", flush=True)  # one write: the ranks share stdout
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
