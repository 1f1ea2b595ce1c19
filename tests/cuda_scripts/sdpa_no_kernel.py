"""`torch.nn.attention.sdpa_kernel` with the math backend left out, as scripts pin a fused kernel: where no enabled
fused kernel of a GPU takes the call, a GPU raises torch's "No available kernel. Aborting execution."; where one
does, the call runs. Prints `<case> ran <sum>` or `<case> error <first line>` per case.

Run: python sdpa_no_kernel.py (on a GPU)"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

torch.manual_seed(0)
q = torch.randn(2, 2, 4, 8, device="cuda")
mask = torch.ones(4, 4, dtype=torch.bool, device="cuda")


def attempt(name: str, backends: list[SDPBackend], *args: torch.Tensor, **kwargs: object) -> None:
    try:
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(*args, **kwargs)
        print(name, "ran", f"{out.float().sum().item():.4f}")
    except RuntimeError as e:
        print(name, "error", str(e).splitlines()[0])


attempt("flash float32", [SDPBackend.FLASH_ATTENTION], q, q, q)  # flash takes float16 and bfloat16 only
attempt("flash float16", [SDPBackend.FLASH_ATTENTION], q.half(), q.half(), q.half())
attempt("flash mask", [SDPBackend.FLASH_ATTENTION], q.half(), q.half(), q.half(), attn_mask=mask)
attempt("efficient float32 mask", [SDPBackend.EFFICIENT_ATTENTION], q, q, q, attn_mask=mask)
attempt("efficient 3-D", [SDPBackend.EFFICIENT_ATTENTION], q[0], q[0], q[0])
attempt("no backend", [], q, q, q)
# grouped-query attention (2 query heads, 1 key/value head): flash (float16, no mask) and cuDNN take it, the
# memory-efficient kernel does not; attn_mask with is_causal: the memory-efficient kernel applies both
kv = q[:, :1]
attempt("flash float16 gqa", [SDPBackend.FLASH_ATTENTION], q.half(), kv.half(), kv.half(), enable_gqa=True)
attempt("flash float16 repeated", [SDPBackend.FLASH_ATTENTION], q.half(), *[kv.repeat(1, 2, 1, 1).half()] * 2)
attempt("efficient gqa", [SDPBackend.EFFICIENT_ATTENTION], q, kv, kv, enable_gqa=True)
attempt("efficient mask causal", [SDPBackend.EFFICIENT_ATTENTION], q, q, q, attn_mask=mask, is_causal=True)
attempt("causal", [SDPBackend.MATH], q, q, q, is_causal=True)
attempt("math", [SDPBackend.MATH], q, q, q)
print("done")
