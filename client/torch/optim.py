"""Optimizers take their multi-tensor (foreach) path on gpupool, as they do on CUDA.

torch picks foreach only for parameters whose exact type is `torch.Tensor`/`Parameter`
(`torch.optim.optimizer._default_to_fused_or_foreach`, `torch.utils._foreach_utils._has_foreach_support`),
so remote tensors would fall to the per-parameter loop: an Adam step of hundreds of single-tensor ops
instead of ~15 list ops. Adding `RemoteTensor` to the two lists of accepted types is the whole patch:
it changes nothing for other tensor types, and the device check already admits the PrivateUse1
backend (`_get_foreach_kernels_supported_devices`). Users can still pass `foreach=False`.
"""

from __future__ import annotations

import torch.optim.optimizer as optimizer
import torch.utils._foreach_utils as foreach_utils

from .tensor import RemoteTensor, RemoteView


def enable_foreach_default() -> None:
    """Idempotent. (`RemoteView`, a remote tensor made by a view op, too: gradients often are.)"""
    for types in (optimizer._foreach_supported_types, foreach_utils._foreach_supported_types):
        for cls in (RemoteTensor, RemoteView):
            if cls not in types:
                types.append(cls)
