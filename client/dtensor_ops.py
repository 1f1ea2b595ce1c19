"""DTensor sharding strategies for the fused attention op gpupool's clients choose: `aten::
_scaled_dot_product_fused_attention_overrideable` and its backward (client/sdpa_choice.h picks torch's `overrideable`
backend for a gpupool device; the daemon runs it, server/attention.py).

torch registers DTensor strategies for CUDA's flash, efficient and cuDNN attention (torch/distributed/tensor/_ops/
_matrix_ops.py) and for none of the PrivateUse1 op, so a tensor-parallel model calling `scaled_dot_product_attention`
on a gpupool mesh (pytorch/examples' fsdp_tp_example.py: the Llama model's heads sharded by `ColwiseParallel`) failed:
"Operator aten._scaled_dot_product_fused_attention_overrideable.default does not have a sharding strategy registered".
These are torch's own for flash/efficient attention, by argument: everything replicated; the heads (dim 1) sharded;
the batch (dim 0) sharded. An attention mask is sharded with them where it has that dimension in full, else (a
broadcast one: (L, S), (1, 1, L, S)) replicated, its gradient then a partial sum. The philox seed and offset are
replicated, as the flash op's rng state (a dropout mask under sharding is not a single device's: torch's limit too).
Registered once, when a gpupool process group is made (client/distributed.py `_create`): any DTensor on gpupool
tensors has one.
"""

from __future__ import annotations

from typing import Any

_registered = False


def _bias_placement(bias: Any, query: Any, dim: int | None, replicated: Any, shard: Any) -> Any:
    """A mask sharded as q/k/v on `dim` where it has that dimension in full, else replicated (broadcast over it)."""
    if dim is None:
        return replicated
    shape, qshape = bias.shape, query.shape
    if len(shape) == len(qshape) and shape[dim] == qshape[dim]:
        return shard(dim)
    return replicated


def register() -> None:
    """Register both strategies with DTensor (idempotent)."""
    global _registered
    if _registered:
        return
    import torch
    from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, PlacementList, RuntimeSchemaInfo
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy, register_op_strategy
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

    aten = torch.ops.aten

    def meta(arg: Any) -> Any:
        return arg.strategies[0].output_spec.tensor_meta

    def forward_lists(schema: OpSchema) -> list[PlacementList]:
        args = schema.args_schema
        query, bias = args[0], args[3] if len(args) > 3 else None
        if not isinstance(query, OpStrategy):
            raise AssertionError(f"Expected OpStrategy, got {type(query)}")
        lists: list[PlacementList] = []
        for dim in (None, 1, 0):  # replicated, the heads sharded, the batch sharded
            p: Any = Replicate() if dim is None else Shard(dim)
            # output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug_attn_mask
            row: PlacementList = [p, p, None, None, None, None, Replicate(), Replicate(), None, p, p, p]
            if isinstance(bias, OpStrategy):
                row.append(_bias_placement(meta(bias), meta(query), dim, Replicate(), Shard))
            lists.append(row)
        return lists

    def backward_lists(schema: OpSchema) -> list[PlacementList]:
        args = schema.args_schema
        query, bias = args[1], args[4]
        if not isinstance(query, OpStrategy):
            raise AssertionError(f"Expected OpStrategy, got {type(query)}")
        lists: list[PlacementList] = []
        for dim in (None, 1, 0):
            p: Any = Replicate() if dim is None else Shard(dim)
            has_bias = isinstance(bias, OpStrategy)
            bias_p = _bias_placement(meta(bias), meta(query), dim, Replicate(), Shard) if has_bias else None
            grad_bias = None if not has_bias else (Partial() if dim is not None and bias_p == Replicate() else bias_p)
            row: PlacementList = [p, p, p, grad_bias]  # grad_query, grad_key, grad_value, grad_attn_bias
            row += [p, p, p, p]  # grad_out, query, key, value
            if has_bias:
                row.append(bias_p)
            row += [p, p]  # out, logsumexp
            row += [Replicate() for i in (8, 9) if isinstance(args[i], OpStrategy)]  # cum_seq_q/k (none here)
            row += [Replicate() for i in (14, 15) if isinstance(args[i], OpStrategy)]  # philox_seed, philox_offset
            lists.append(row)
        return lists

    forward = aten._scaled_dot_product_fused_attention_overrideable.default

    @register_op_strategy(forward, schema_info=RuntimeSchemaInfo(4))  # dropout_p, is_causal, ...: static
    def forward_strategy(schema: OpSchema) -> OpStrategy:
        mesh = schema.get_mesh_from_args()
        return expand_to_full_mesh_op_strategy(mesh, schema, forward_lists(schema), input_index=9)

    @register_op_strategy(aten._scaled_dot_product_fused_attention_overrideable_backward.default)
    def backward_strategy(schema: OpSchema) -> OpStrategy:
        mesh = schema.get_mesh_from_args(validate=False)
        return expand_to_full_mesh_op_strategy(mesh, schema, backward_lists(schema), input_index=4)

    _registered = True
