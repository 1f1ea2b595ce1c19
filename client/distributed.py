"""The torch.distributed backend `gpupool`: collectives run between the daemons, never through the clients.

    # under `gpupool run -n 2 -- torchrun --nproc-per-node 2 train.py`
    import gpupool.torch                             # registers the device and this backend
    dist.init_process_group("gpupool")
    dev = torch.device("gpupool", 0)                 # rank i sees device i of the lease as gpupool:0
    model = DDP(Net().to(dev))

Each collective is one command in the rank's ordered session stream (`Collective`); the daemons of the
lease's sessions run it among themselves (server/collectives.py: gloo, NCCL on real GPUs). Like NCCL on a CUDA
stream, a collective "completes" for the caller when it is enqueued: later ops of the stream see its result,
and its Work/future is already done, so DDP's bucketing and overlap keep working; a failure poisons the
collective's tensors and is raised at the next sync point (`.item()`, `.cpu()`, `gpupool.torch.synchronize`).
`barrier()` waits for real (a sync of the stream).

Rendezvous: every rank publishes its lease device index in torch's own c10d store; the daemon of rank 0 then
hosts a TCPStore for the daemons, whose address travels to the other ranks through the c10d store; each
daemon verifies every rank's lease token before it joins (see docs/distributed.md for the trust model).
"""

from __future__ import annotations

import atexit
import datetime
import functools
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from gpupool._proto import device_pb2
from gpupool.errors import FailedPrecondition, InvalidArgument
from gpupool.tokens import unverified_claim

from . import dcp, dtensor_ops, fsdp, funcol

log = logging.getLogger(__name__)

BACKEND = "gpupool"
# torch's backend of `init_process_group()` without one (a backend per device type: gpupool's for gpupool tensors), and
# so of that group's `new_group(ranks)` and of `init_device_mesh` on a process with no group yet: a group of some
# ranks made so is a subgroup too (`_wrap_helper`; until round 47 it was refused as a second group: "a second gpupool
# process group on gpupool:0 (rank 0 of 2)", the 2-D mesh of pytorch/examples' fsdp_tp_example.py)
UNDEFINED = "undefined"
MAX_TIMEOUT = 300.0  # the daemons cap it too: the longest a collective waits for its peers
_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.AVG: "avg", dist.ReduceOp.PRODUCT: "product",
        dist.ReduceOp.MIN: "min", dist.ReduceOp.MAX: "max"}  # fmt: skip


class _Done(dist._Work):  # type: ignore[misc,name-defined]
    """A collective enqueued on the stream: done for the caller, like a NCCL work on a CUDA stream."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self._future: torch.futures.Future[Any] = torch.futures.Future()
        self._future.set_result(result)

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def get_future(self) -> torch.futures.Future[Any]:
        return self._future


class _Queued(_Done):
    """A send or receive queued in its group (`ProcessGroupGpupool._flush_p2p`): waiting on it, or asking whether it
    is done, runs the group's queue first; then it is done, as any other collective enqueued on the stream. `source`
    answers a `recv` without a source."""

    def __init__(self, result: Any, flush: Callable[[], None], source: int) -> None:
        super().__init__(result)
        self._flush, self._src = flush, source

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        self._flush()
        return True

    def is_completed(self) -> bool:
        self._flush()
        return True

    def get_future(self) -> torch.futures.Future[Any]:
        self._flush()
        return self._future

    def _source_rank(self) -> int:
        return self._src


class ProcessGroupGpupool(dist.ProcessGroup):  # type: ignore[misc]
    """One rank's side of the group: turns collectives into commands of its device's session stream."""

    def __init__(self, rank: int, size: int, runtime: Any) -> None:
        super().__init__(rank, size)  # type: ignore[call-arg]
        self._rank, self._size = rank, size
        self._rt = runtime
        self._name, self._desc = "", ""
        self._p2p: list[tuple[int, int, torch.Tensor, int]] = []  # queued: (sender, tag, tensor, peer)
        self._number = 0  # its daemons' number for it: 0 the default group, else a subgroup's (`_SubgroupView`)
        self._subgroups = 0  # the subgroups of it made so far (each numbered by the next)

    # torch keeps a group's name in its C++ backends, and this group has none (it is the whole process group):
    # without these, `group_name` raised "ProcessGroup name not set" (DeviceMesh, functional collectives, FSDP2)
    def getGroupName(self) -> str:  # noqa: N802 - torch's name
        return self._name

    def setGroupName(self, name: str) -> None:  # noqa: N802
        self._name = name

    def getGroupDesc(self) -> str:  # noqa: N802
        return self._desc

    def setGroupDesc(self, desc: str) -> None:  # noqa: N802
        self._desc = desc

    @property
    def _device_types(self) -> list[torch.device]:
        """The group's devices, for torch's Python (`_get_pg_default_device`: DCP's `set_model_state_dict`): torch's
        own property lists those of the group's C++ backends, none here ("Default device not found")."""
        return [torch.device(BACKEND)]

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank

    # ---- collectives ----

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> _Done:  # type: ignore[override]
        self._send("allreduce", tensors, [], op=_op(opts))
        return _Done(tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> _Done:
        self._send("allreduce", tensors, [], op=_op(opts))
        return _Done(tensors)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> _Done:  # type: ignore[override]
        root = int(getattr(opts, "rootRank", 0))
        self._send("broadcast", tensors, [], root=root)
        return _Done(tensors)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> _Done:  # type: ignore[override]
        if len(outputs) != 1 or len(inputs) != 1:
            raise InvalidArgument("allgather on gpupool takes one input tensor per rank (one device per process)")
        self._send("allgather", outputs[0], inputs)
        return _Done(outputs)

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Done:  # noqa: A002
        self._send("allgather", list(output.reshape(-1).chunk(self._size)), [input.reshape(-1)])
        return _Done(output)

    def reduce_scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None) -> _Done:  # type: ignore[override]
        if len(outputs) != 1 or len(inputs) != 1:
            raise InvalidArgument("reduce_scatter on gpupool takes one output tensor per rank")
        self._send("reduce_scatter", outputs, inputs[0], op=_op(opts))
        return _Done(outputs)

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Done:  # noqa: A002
        self._send("reduce_scatter", [output], [input], op=_op(opts))
        return _Done(output)

    def scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None) -> _Done:  # type: ignore[override]
        """`dist.scatter` as a broadcast of the source's whole list, of which each rank keeps its own chunk: the
        daemons have no scatter. torch's scatter takes chunks of one size, so every rank knows the whole's; it moves
        `size` times a scatter's bytes. DTensor's `distribute_tensor` (a `Shard` placement from rank 0's tensor, as
        FSDP2's checkpoint loading does) scatters: until round 36 it failed."""
        if len(outputs) != 1 or len(inputs) > 1:
            raise InvalidArgument("scatter on gpupool takes one output tensor per rank (one device per process)")
        out = outputs[0]
        if inputs:
            chunks = inputs[0]
            if len(chunks) != self._size or any(c.shape != out.shape or c.dtype != out.dtype for c in chunks):
                raise InvalidArgument(
                    f"scatter on gpupool takes {self._size} chunks shaped as the output {tuple(out.shape)} "
                    f"({out.dtype}); got {[tuple(c.shape) for c in chunks]}"
                )
            whole = torch.cat([c.reshape(-1) for c in chunks])
        else:
            whole = out.new_empty(self._size * out.numel())
        self._send("broadcast", [whole], [], root=int(getattr(opts, "rootRank", 0)))
        out.copy_(whole.narrow(0, self._rank * out.numel(), out.numel()).view_as(out))
        return _Done(outputs)

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> _Done:  # type: ignore[override]
        """`dist.reduce` as an allreduce: the root's tensor takes the result in place; every other rank reduces a copy
        of its own and keeps its tensor as it was (as NCCL's reduce leaves a non-root buffer; gloo's writes partial
        sums there, which torch documents as undefined). The daemons have no reduce: it moves the result to every
        rank, as an allreduce does, and their checks (agreement, sizes, quotas) are the allreduce's. Until round 38
        it was one InvalidArgument."""
        if len(tensors) != 1:
            raise InvalidArgument("reduce on gpupool takes one tensor per rank (one device per process)")
        root = self._root(opts, "reduce")
        t = tensors[0] if root == self._rank else tensors[0].detach().clone()
        self._send("allreduce", [t], [], op=_op(opts))
        return _Done(tensors)

    def gather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> _Done:  # type: ignore[override]
        """`dist.gather` (and `gather_object`) as an allgather: the root gathers into its list, every other rank into
        a buffer of its own that it drops (torch gives it no list). It moves `size` times a gather's bytes; the
        daemons' checks are the allgather's. Until round 38 it was one InvalidArgument."""
        if len(inputs) != 1 or len(outputs) > 1:
            raise InvalidArgument("gather on gpupool takes one input tensor per rank (one device per process)")
        root, mine = self._root(opts, "gather"), inputs[0]
        gathered = list(outputs[0]) if outputs else []
        if root == self._rank:
            if len(gathered) != self._size or any(o.shape != mine.shape or o.dtype != mine.dtype for o in gathered):
                raise InvalidArgument(
                    f"gather on gpupool: the root takes a list of {self._size} tensors shaped as the input "
                    f"{tuple(mine.shape)} ({mine.dtype}); got {[tuple(o.shape) for o in gathered]}"
                )
        elif gathered:
            raise InvalidArgument(
                f"gather on gpupool: only the root (rank {root}) takes a list; rank {self._rank} got one"
            )
        else:
            gathered = [c.view_as(mine) for c in mine.new_empty(self._size * mine.numel()).chunk(self._size)]
        self._send("allgather", gathered, [mine])
        return _Done(outputs)

    # torch >= 2.12's names of the two (all_gather_into_tensor, reduce_scatter_tensor: FSDP2's collectives)
    all_gather_single = _allgather_base  # type: ignore[assignment]
    reduce_scatter_single = _reduce_scatter_base  # type: ignore[assignment]

    # ---- all-to-all: an allgather, of which each rank keeps the pieces sent to it ----

    def alltoall_base(  # type: ignore[override]
        self,
        output: torch.Tensor,
        input: torch.Tensor,  # noqa: A002 - torch's name
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: Any = None,
    ) -> _Done:
        """`dist.all_to_all_single` (MoE token routing, sequence parallelism): an allgather of every rank's whole
        input, of which each rank keeps the rows sent to it. The daemons have no all-to-all: its checks are the
        allgather's (agreement, sizes, quotas), and it moves `size` times an all-to-all's bytes. Without split sizes
        every rank's input is the same size (else the allgather's agreement refuses the call on every rank). With
        them the ranks first all-gather their splits (`2 * size` integers) and read them (one round trip): every rank
        checks the whole table alike, then pads its input to the largest rank's. Until round 39 one InvalidArgument."""
        self._all_to_all(output, input, list(output_split_sizes), list(input_split_sizes))
        return _Done(output)

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> _Done:  # type: ignore[override]
        """`dist.all_to_all` (a list of tensors each way): `alltoall_base` of the flattened lists, with each tensor's
        element count as its split (so always the round trip that reads the splits)."""
        n = self._size
        if len(outputs) != n or len(inputs) != n:
            raise InvalidArgument(
                f"all_to_all on gpupool takes {n} output and {n} input tensors; got {len(outputs)} and {len(inputs)}"
            )
        flat_in = torch.cat([t.reshape(-1) for t in inputs])
        flat_out = flat_in.new_empty(sum(t.numel() for t in outputs))
        out_splits = [t.numel() for t in outputs]
        self._all_to_all(flat_out, flat_in, out_splits, [t.numel() for t in inputs])
        for o, piece in zip(outputs, flat_out.split(out_splits), strict=True):
            o.copy_(piece.view(o.shape))
        return _Done(outputs)

    all_to_all_single = alltoall_base  # type: ignore[assignment]  # torch >= 2.12's name

    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        n, me = self._size, self._rank
        given = bool(in_splits or out_splits)  # the same on every rank of a sound call: the path taken is too
        refused = _a2a_refusal(out, inp, out_splits, in_splits, n)
        if refused is None:
            in_splits = in_splits or [inp.shape[0] // n] * n
            out_splits = out_splits or [out.shape[0] // n] * n
        flat = inp.reshape(-1)
        if not given and refused is None:
            # equal splits: every rank's input is as large, which the allgather's agreement checks
            gathered = flat.new_empty(n * flat.numel())
            self._send("allgather", list(gathered.chunk(n)), [flat])
            out.copy_(gathered.view(n, n, -1)[:, me].reshape(out.shape))
            return
        # The splits' table: every rank's input and output splits. A call refused here takes part in it, its row all
        # -1, so that every rank refuses alike (a call that skipped it left its peers waiting out the group's
        # timeout); where the peers took the equal path the daemons' agreement refuses both kinds of call instead.
        mine = torch.tensor([-1] * 2 * n if refused else in_splits + out_splits, dtype=torch.int64)
        mine = mine.to(inp.device)
        table = mine.new_empty(n * 2 * n)
        self._send("allgather", list(table.chunk(n)), [mine])
        try:
            rows = table.view(n, 2 * n).tolist()  # one round trip (a sync)
        except InvalidArgument:
            if refused is not None:
                raise InvalidArgument(refused) from None
            raise
        if refused is not None:
            raise InvalidArgument(refused)
        rows_of = [(r[:n], r[n:]) for r in rows]
        if any(r[0] < 0 for r in rows):
            bad = [i for i, r in enumerate(rows) if r[0] < 0]
            raise InvalidArgument(f"all_to_all on gpupool: rank(s) {bad} refused their call (their own error says why)")
        for i in range(n):
            for k in range(n):
                if rows_of[i][0][k] != rows_of[k][1][i]:  # every rank checks the whole table: all refuse alike
                    raise InvalidArgument(
                        f"all_to_all on gpupool: rank {i} sends rank {k} {rows_of[i][0][k]} rows, but rank {k} "
                        f"expects {rows_of[k][1][i]} from rank {i} (ranks' split sizes disagree)"
                    )
        row = inp.shape[1:].numel()
        widest = max(sum(sends) for sends, _ in rows_of) * row
        if flat.numel() < widest:
            padded = flat.new_zeros(widest)
            padded[: flat.numel()].copy_(flat)
            flat = padded
        gathered = flat.new_empty(n * widest)
        if widest:
            self._send("allgather", list(gathered.chunk(n)), [flat])
        pieces = []
        for i, (sends, _) in enumerate(rows_of):
            start = i * widest + sum(sends[:me]) * row
            pieces.append(gathered[start : start + sends[me] * row])
        out.copy_(torch.cat(pieces).view(out.shape))

    # ---- point to point: in a group of two, broadcasts between the two ranks; in a larger one, the daemons' links ----

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> _Done:  # type: ignore[override]
        """`dist.send`/`isend`. In a group of two: a broadcast from this rank, which its peer's `recv` matches (the
        daemons check that the two calls agree: sizes, dtype, root). In a larger group (round 44): a transfer over the
        daemons' link between the two ranks (`_flush_p2p`). Either way it is queued until the rank waits on one of its
        queued sends or receives (or calls any other collective): `_flush_p2p` then runs the queue, so an exchange
        where both ranks send first (`batch_isend_irecv([isend, irecv])` on both: until round 39 "ranks disagree on a
        collective broadcast") runs as NCCL runs it."""
        self._pair("send", dst)
        return self._queue(self._rank, self._one(tensors, "send")[0], tag, dst)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> _Done:  # type: ignore[override]
        self._pair("recv", src)
        return self._queue(src, self._one(tensors, "recv")[0], tag, src)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> _Done:  # type: ignore[override]
        """`dist.recv` without a source: in a group of two, from the other rank. In a larger group one InvalidArgument:
        a rank's transfers come over a link per peer, and a receive from whichever sends first is not done."""
        if self._size != 2:
            raise InvalidArgument(
                f"recv without a source on gpupool runs in a group of two only (this one has {self._size} ranks): "
                "name the sender (dist.recv(t, src=...))"
            )
        src = 1 - self._rank
        self._pair("recv", src)
        return self._queue(src, self._one(tensors, "recv")[0], tag, src)

    def _queue(self, sender: int, t: torch.Tensor, tag: int, peer: int) -> _Done:
        self._handle(t)  # refused now if it is not this rank's tensor
        self._p2p.append((sender, int(tag), t, peer))
        return _Queued([t], self._flush_p2p, sender)

    def _flush_p2p(self) -> None:
        """Run the queued sends and receives: first every one rank 0 sends, then every one rank 1 sends, each
        direction in the order the ranks called them, stably sorted by tag; both ranks derive the same order from
        their own queues, whatever order each queued them in. When a queue holds a tag other than 0 the ranks
        first all-gather their (sender, tag) lists and refuse (InvalidArgument, on both alike) where they differ:
        tags match as gloo's do within what one wait runs; without tags (NCCL's way) order matches."""
        if not self._p2p:
            return
        if self._size > 2:
            self._flush_links()
            return
        queued, self._p2p = sorted(self._p2p, key=lambda q: (q[0], q[1])), []
        if any(tag for _, tag, _, _ in queued):
            mine = torch.tensor([v for sender, tag, _, _ in queued for v in (sender, tag)], dtype=torch.int64)
            mine = mine.to(queued[0][2].device)
            both = mine.new_empty(2 * mine.numel())
            self._send("allgather", list(both.chunk(2)), [mine])
            lists = both.view(2, -1).tolist()  # one round trip
            if lists[0] != lists[1]:
                raise InvalidArgument(
                    f"send/recv on gpupool: the two ranks' queued (sender, tag) pairs differ: rank 0 {lists[0]}, "
                    f"rank 1 {lists[1]}"
                )
        for sender, _, t, _ in queued:
            self._send("broadcast", [t], [], root=sender)

    def _flush_links(self) -> None:
        """A group of three or more (round 44; until then one InvalidArgument, so pipelines of more than two stages
        did not run): the queue as one `p2p` command, in call order, each transfer naming its peer, tag and
        direction. The daemons move each over the link between its two ranks (formed at their first transfer), with
        sends and receives of the batch at once (a ring drains), a receive matched to its peer's sends by tag and
        checked (dtype, size) before a byte is written: server/collectives.py `_p2p`. Only the two ranks of a transfer
        take part; the rest of the group runs on."""
        queued, self._p2p = self._p2p, []
        msg = device_pb2.Collective(kind="p2p")
        msg.tensors.extend(self._handle(t) for _, _, t, _ in queued)
        msg.peers.extend(peer for _, _, _, peer in queued)
        msg.tags.extend(tag for _, tag, _, _ in queued)
        msg.sending.extend(sender == self._rank for sender, _, _, _ in queued)
        self._rt.command(device_pb2.Command(collective=msg), flush=True)

    def _pair(self, what: str, peer: int) -> None:
        if peer == self._rank or not 0 <= peer < self._size:
            if self._size == 2:
                raise InvalidArgument(
                    f"{what} on gpupool: rank {self._rank}'s peer is rank {1 - self._rank}, not {peer}"
                )
            raise InvalidArgument(
                f"{what} on gpupool: rank {self._rank} of {self._size} sends to and receives from another rank of "
                f"the group (0-{self._size - 1}), not {peer}"
            )

    @staticmethod
    def _one(tensors: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        if len(tensors) != 1:
            raise InvalidArgument(f"{what} on gpupool takes one tensor")
        return tensors

    def _root(self, opts: Any, what: str) -> int:
        root = int(getattr(opts, "rootRank", 0))
        if not 0 <= root < self._size:
            raise InvalidArgument(f"{what} root {root} is not a rank of a group of {self._size}")
        return root

    def barrier(self, opts: Any = None) -> _Done:
        self._send("barrier", [], [])
        self._rt.sync()  # a barrier blocks the caller: wait until the daemons have met
        return _Done(None)

    def _send(
        self, kind: str, tensors: list[torch.Tensor], inputs: list[torch.Tensor], op: str = "", root: int = 0
    ) -> None:
        if self._p2p:  # queued sends and receives run first, in the order the program called them
            self._flush_p2p()
        msg = device_pb2.Collective(kind=kind, reduce_op=op, root=root, subgroup=self._number)
        msg.tensors.extend(self._handle(t) for t in tensors)
        msg.inputs.extend(self._handle(t) for t in inputs)
        # The peers wait for this rank: never leave a collective in the client's batch.
        self._rt.command(device_pb2.Command(collective=msg), flush=True)

    def _handle(self, t: torch.Tensor) -> int:
        if hasattr(self._rt, "handle"):  # the C++ client's (gpupool.client.native.group.NativeRuntime)
            return int(self._rt.handle(t))
        rt = getattr(t, "_gp_rt", None)
        if rt is not self._rt:
            raise InvalidArgument(
                f"a collective of the gpupool backend got a tensor on {t.device}; this rank's tensors live on "
                f"{self._rt.device} (move them there: tensor.to({str(self._rt.device)!r}))"
            )
        from .torch.tensor import own

        own(t)  # type: ignore[arg-type]  # a lazy view (`RemoteView`) gets a daemon tensor of its own, written in place
        handle = int(t._gp_h)  # type: ignore[attr-defined]
        if rt.pending and handle in rt.pending:  # made by torch.empty and not sent yet
            rt.materialize_pending()
        return handle


class _SubgroupView(ProcessGroupGpupool):
    """A gpupool group of some ranks of the default group (`_subgroup`): its collectives are those of the daemons'
    subgroup numbered `number` (round 45), in the stream after what the default group queued; its send and receive
    are the default group's between the same ranks (queued in the default group, in call order with its own)."""

    def __init__(self, rank: int, size: int, parent: ProcessGroupGpupool, ranks: list[int], number: int) -> None:
        super().__init__(rank, size, parent._rt)
        self._parent, self._ranks, self._number = parent, sorted(ranks), number
        self._left = False

    def shutdown(self) -> None:
        """`dist.destroy_process_group(subgroup)` (and the default group's destroy, which shuts every group down):
        this rank's daemon leaves the subgroup (`GroupLeave`, round 46), after what the session called on it before,
        so its links close and its number and place among the session's 32 are free; until round 46 the daemons were
        not told, and a script that made and dropped subgroups in a loop was refused its 33rd. No round trip: a
        refusal is raised at the next sync point, as any command's. Its send and receive are the default group's (queued
        there, they run as before)."""
        if self._left or self._rt.closed:
            return
        self._left = True
        self._rt.command(device_pb2.Command(group_leave=device_pb2.GroupLeave(subgroup=self._number)))
        log.info("rank %d left subgroup %s of the daemons' group", self._parent._rank, self._ranks)

    def _global(self, what: str, peer: int) -> int:
        if not 0 <= peer < self._size or peer == self._rank:
            raise InvalidArgument(
                f"{what} on gpupool: rank {self._rank} of a group of {self._size} sends to and receives from another "
                f"rank of the group (0-{self._size - 1}), not {peer}"
            )
        return self._ranks[peer]

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> _Done:  # type: ignore[override]
        return self._parent.send(tensors, self._global("send", dst), tag)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> _Done:  # type: ignore[override]
        return self._parent.recv(tensors, self._global("recv", src), tag)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> _Done:  # type: ignore[override]
        """As the default group's: in a subgroup of two, from the other member (round 45; until then one
        InvalidArgument in every subgroup); its source is told in the subgroup's ranks, as torch asks."""
        if self._size != 2:
            raise InvalidArgument(
                f"recv without a source on gpupool runs in a group of two only (this subgroup has {self._size} ranks): "
                "name the sender (dist.recv(t, src=...))"
            )
        src = 1 - self._rank
        self._parent.recv(tensors, self._ranks[src], tag)
        return _Queued(tensors, self._parent._flush_p2p, src)

    def _send(
        self, kind: str, tensors: list[torch.Tensor], inputs: list[torch.Tensor], op: str = "", root: int = 0
    ) -> None:
        if self._left:
            raise FailedPrecondition(
                f"{kind} on gpupool subgroup {self._ranks} after destroy_process_group of it: make a new group"
            )
        if self._parent._p2p:  # the default group's queued sends and receives run first, in call order
            self._parent._flush_p2p()
        super()._send(kind, tensors, inputs, op, root)


def _a2a_refusal(
    out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], n: int
) -> str | None:
    """Why this rank's all_to_all cannot run, from its own tensors and split sizes (None: it can)."""
    if inp.dim() == 0 or out.dim() == 0 or inp.shape[1:].numel() != out.shape[1:].numel():
        return (
            f"all_to_all on gpupool splits dim 0 of tensors whose rows match: input {tuple(inp.shape)}, output "
            f"{tuple(out.shape)}"
        )
    for what, splits, rows in (("input", in_splits, inp.shape[0]), ("output", out_splits, out.shape[0])):
        if not splits and rows % n:
            return f"all_to_all on gpupool: the {what}'s {rows} rows do not split into {n} equal parts"
        if splits and (len(splits) != n or min(splits) < 0 or sum(splits) != rows):
            return f"all_to_all on gpupool: {what} split sizes {splits} are not {n} sizes summing to its {rows} rows"
    if not in_splits and not out_splits and out.numel() != inp.numel():
        return f"all_to_all on gpupool: equal splits of an input of {inp.numel()} elements into {out.numel()}"
    return None


def _flush_at_exit(group: ProcessGroupGpupool) -> None:
    """Send what the group still queues (an `isend` the script never waited on: NCCL sends it, and its peer waits)."""
    if group._p2p and not group._rt.closed:
        try:
            group._flush_p2p()
        except Exception as exc:  # at exit there is no one left to tell
            log.warning("gpupool backend: queued sends and receives at shutdown: %s", exc)


def _drain(rt: Any) -> None:
    """Wait until the daemon has run this rank's queued work (collectives included). A rank that exits right after
    its last enqueued allreduce would otherwise close its session while its peers still wait in that allreduce."""
    if rt.closed:
        return
    try:
        rt.sync()
    except Exception as exc:  # reported by the training loop's own syncs; at exit there is no one left to tell
        log.warning("gpupool backend: draining %s at shutdown: %s", rt.device, exc)


def _op(opts: Any) -> str:
    op = getattr(opts, "reduceOp", dist.ReduceOp.SUM)
    for known, name in _OPS.items():
        if op == known:
            return name
    raise InvalidArgument(f"reduce op {op} is not supported by the gpupool backend (sum, avg, product, min, max)")


def _own_device(rank: int, devices: int, current: int, named: int | None = None) -> tuple[int, int]:
    """This rank's device: (its gpupool index in this process, its index in the lease).

    `named` is the index of `init_process_group(device_id=torch.device("gpupool", N))` (or new_group's): that device,
    whose lease device pool.rank_device names as for any tensor (another torchrun rank's own device is refused there
    with the rule). Without one:

    A torchrun rank (LOCAL_RANK set) sees its own lease device LOCAL_RANK as gpupool:0 (client/torch/api.py). A
    process started otherwise -- torch.multiprocessing.spawn, as pytorch/examples' ddp-tutorial-series/multigpu.py
    does, with no LOCAL_RANK -- sees the lease's devices in lease order: its device is the current one
    (`torch.cuda.set_device(rank)`), or, while that is still device 0, device `rank mod n`: NCCL's guess for a rank
    that never set its device (until round 33 rank r claimed lease device r while binding its group to gpupool:0,
    and its daemon refused the join: "rank 1's token is not this session's device").

    Which lease device a gpupool index is comes from pool.rank_device, the rule the device's attach follows too (one
    rule: until round 35 this function had its own copy of it). The range check on LOCAL_RANK is this function's
    own: rank_device refuses nothing for LOCAL_RANK alone (another launcher, a variable left over), but a group needs
    a device of its own for each rank."""
    from .pool import rank_device

    if named is not None:
        if not 0 <= named < devices:
            raise InvalidArgument(f"device_id gpupool:{named} but the lease has {devices} device(s)")
        return named, rank_device(named, devices)
    if os.environ.get("LOCAL_RANK") is not None:
        local = int(os.environ["LOCAL_RANK"])
        if not 0 <= local < devices:
            raise InvalidArgument(f"LOCAL_RANK {local} but the lease has {devices} device(s): gpupool run -n N")
        index = 0
    else:
        index = current if current != 0 else rank % devices
        if not 0 <= index < devices:
            raise InvalidArgument(f"rank {rank} is on gpupool:{index} but the lease has {devices} device(s)")
    return index, rank_device(index, devices)


def _join_message(tokens: list[str], devices: list[int], rank: int, seconds: float) -> device_pb2.GroupJoin:
    """This rank's GroupJoin: `tokens` are the lease's, in lease order; `devices[r]` is rank r's lease device.

    A lease token is a bearer credential for its device's session, so a rank sends its daemon only its own when
    that token carries the lease's `group` claim (every token the scheduler issues for a lease of several
    devices): the daemon keys the group from that claim, the same in every token of the lease, and needs no
    other rank's (until round 35 every rank sent every rank's, and a hostile host of the job could attach, as the
    tenant, to the other hosts' devices whenever their rank's session was not attached). Hand-minted tokens have
    no `group` claim: the daemons derive the group's secret from rank 0's token then, so every rank sends all."""
    own = tokens[devices[rank]]
    sent = [own] if unverified_claim(own, "group") else [tokens[d] for d in devices]
    return device_pb2.GroupJoin(rank=rank, size=len(devices), tokens=sent, timeout_seconds=seconds)


def _create(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> ProcessGroupGpupool:
    """The backend's creator: attach this rank's leased device and join the daemons' group."""
    from . import native
    from .pool import Lease

    if not os.environ.get("GPUPOOL_LEASE"):
        raise InvalidArgument(
            "the gpupool backend needs a lease: start the job under `gpupool run -n N -- torchrun ...`"
        )
    lease = Lease.from_env()
    assert lease is not None  # GPUPOOL_LEASE is set
    dtensor_ops.register()  # DTensor's strategies for the fused attention op on gpupool tensors: client/dtensor_ops.py
    rt: Any
    if native.active():  # the C++ client (`gpupool run`'s default)
        from .native.group import NativeRuntime

        funcol.register_kernels()  # torch's functional collectives (DTensor's) on gpupool tensors: client/funcol.py

        index, local = _own_device(rank, len(lease.devices), native.current_index(), _named_device())
        dev = torch.device("gpupool", index)
        session = native.ensure_session(index)
        if (view := _subgroup(session, dev, rank, size, timeout)) is not None:
            return view
        _refuse_second_group(session, dev, rank, size)
        rt = NativeRuntime(index, session)
        lease = native.lease()  # the renewed one: its tokens are current
    else:
        from .torch import api, runtime, transfer

        transfer.SPECIAL.update(funcol.special_handlers())  # the same, from the Python client's dispatch

        index, local = _own_device(rank, len(lease.devices), api.current_index(), _named_device())
        dev = api.device(index)
        lease = api.env_lease() or lease  # the renewed one: its tokens are current
        rt = runtime.get(dev.index)
        assert rt is not None
        session = rt
        if (view := _subgroup(session, dev, rank, size, timeout)) is not None:
            return view
        _refuse_second_group(session, dev, rank, size)
    store.set(f"gpupool/dev/{rank}", str(local))
    devices = [int(store.get(f"gpupool/dev/{r}")) for r in range(size)]
    seconds = _seconds(timeout)
    join = _join_message([d.token for d in lease.devices], devices, rank, seconds)
    if rank == 0:
        join.port_handle = rt.new_handle()
        rt.command(device_pb2.Command(group_join=join))
        (port,) = rt.sync([join.port_handle])
        rt.free([join.port_handle])
        host = lease.devices[devices[0]].address.rpartition(":")[0]
        store.set("gpupool/store", f"{host}:{port}")
    else:
        join.store_address = store.get("gpupool/store").decode()
        rt.command(device_pb2.Command(group_join=join))
        rt.sync()  # a refused join (tokens, address) raises here, at init_process_group
    group = ProcessGroupGpupool(rank, size, rt)
    _joined.append((session, f"rank {rank} of {size}", group))
    atexit.register(_drain, rt)  # runs before gpupool.torch's detach_all (atexit is last in, first out)
    log.info("rank %d of %d on %s joined the daemons' group", rank, size, dev)
    atexit.register(_flush_at_exit, group)  # before `_drain` (last in, first out): an isend never waited on still goes
    return group


# The sessions of this process that joined the daemons' group, with their place in it and their group
# (`_refuse_second_group`, `_subgroup`)
_joined: list[tuple[Any, str, ProcessGroupGpupool]] = []
# The global ranks of the group being made (`_wrap_helper`: torch's creator is given the store, rank, size and timeout
# only); empty for a default group (init_process_group)
_members: list[list[int]] = []


def _second_group(dev: torch.device, rank: int, size: int, place: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"a second gpupool process group on {dev} (rank {rank} of {size}): this rank's session already "
        f"joined the daemons' group as {place}, and a session joins one group for its life; re-initializing after "
        "destroy_process_group is not supported on gpupool (docs/distributed.md)"
    )


def _subgroup(
    session: Any, dev: torch.device, rank: int, size: int, timeout: datetime.timedelta
) -> ProcessGroupGpupool | None:
    """A group of some ranks of the default group (`dist.new_group(ranks)`, a DeviceMesh dimension) on a session that
    joined the default one: a subgroup of the daemons' group (round 45), which this rank's daemon joins now (refused
    there unless this rank is a member; formed by the daemons over the default group, in the order the ranks make
    their groups), and whose collectives run among its members' daemons (`_SubgroupView`); its send and receive are
    the default group's between the same ranks (round 44). Until round 45 its collectives were one
    FailedPrecondition. None where this is no subgroup of a joined session."""
    ranks = _members[-1] if _members else []
    for joined, _, parent in _joined:
        if joined is session and ranks:
            parent._subgroups += 1
            number = parent._subgroups
            join = device_pb2.GroupJoin(subgroup=number, members=sorted(ranks), timeout_seconds=_seconds(timeout))
            parent._rt.command(device_pb2.Command(group_join=join))
            parent._rt.sync()  # a refused join raises here, at new_group
            log.info("rank %d of %d (%s) joined subgroup %s of the daemons' group", rank, size, dev, sorted(ranks))
            return _SubgroupView(rank, size, parent, ranks, number)
    return None


def _seconds(timeout: datetime.timedelta) -> float:
    """A group's timeout for its daemons: torch's default (30 min, also what it passes when the script gives none)
    leaves the choice to the daemon (30 s)."""
    return 0.0 if timeout == default_pg_timeout else min(timeout.total_seconds(), MAX_TIMEOUT)


def _refuse_second_group(session: Any, dev: torch.device, rank: int, size: int) -> None:
    """Refuse a second gpupool group on a session that already joined one, before any store key or join: a session
    joins one group for its life (the daemon refuses another join), and until round 41 a `dist.new_group(...)`, a
    re-`init_process_group` after `destroy_process_group`, or a sub-mesh of `init_device_mesh` hung its ranks but
    the first (rank 0's join refused: "session already joined its collective group"; the others waiting for its
    store address until torch's 30-minute default timeout). Every member of the new group refuses it here at once,
    so none waits for another, and the default group goes on. (Since round 44 a subgroup of the default group gets
    here no more: `_subgroup` makes it a view; since round 45 its collectives run, on a subgroup of the daemons'.)"""
    for joined, place, _ in _joined:
        if joined is session:
            raise _second_group(dev, rank, size, place)


# The device the group being made binds (`device_id=`), for its creator, which torch gives only the store, rank, size
# and timeout (`_create`). Groups are made one at a time: every rank makes each group collectively, in order.
_binding: list[torch.device] = []


def _named_device() -> int | None:
    return None if not _binding or _binding[-1].index is None else int(_binding[-1].index)


def _wrap_helper(helper: Callable[..., Any]) -> Callable[..., Any]:
    """torch's `_new_process_group_helper` with a gpupool group's `device_id` (init_process_group's, new_group's)
    given to the creator, which binds that device, and not to torch: torch asks the group's C++ backend for that
    device (to split communicators from), and this group is a Python process group with none. Until round 36
    `init_process_group("gpupool", device_id=torch.device("gpupool", 0))` failed there: "No backend type associated
    with device type gpupool". (`bound_device_id` stays unset: torch would ask for that backend again in new_group.)"""
    signature = inspect.signature(helper)

    @functools.wraps(helper)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        backend = str(bound.arguments.get("backend")).lower()
        if backend not in (BACKEND, UNDEFINED):
            return helper(*args, **kwargs)
        _members.append([int(r) for r in bound.arguments.get("global_ranks_in_group") or []])
        try:
            return _with_device(helper, bound) if backend == BACKEND else helper(*args, **kwargs)
        finally:
            _members.pop()

    return wrapped


def _with_device(helper: Callable[..., Any], bound: inspect.BoundArguments) -> Any:
    """`helper` with a gpupool `device_id` given to the creator (`_binding`), not to torch."""
    device_id = bound.arguments.get("device_id")
    if device_id is None:
        return helper(*bound.args, **bound.kwargs)
    device_id = torch.device(device_id)
    if device_id.type != BACKEND:
        raise InvalidArgument(f"the gpupool backend binds a gpupool device; device_id={device_id} is not one")
    bound.arguments["device_id"] = None
    _binding.append(device_id)
    try:
        return helper(*bound.args, **bound.kwargs)
    finally:
        _binding.pop()


def register() -> None:
    """Make `dist.init_process_group("gpupool")` available (idempotent)."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create, devices=[BACKEND])
        import torch.distributed.distributed_c10d as c10d

        c10d._new_process_group_helper = _wrap_helper(c10d._new_process_group_helper)
        fsdp.install()
        dcp.install()
