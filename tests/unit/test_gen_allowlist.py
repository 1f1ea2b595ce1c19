"""scripts/gen_allowlist.py keeps what was reviewed: every overload of an op that server/guards.py guards by hand is on
the generated list. Until round 33 its `guarded()` did not read the schema guards (the fused optimizers' lists), and
no trace reaches AdamW/SGD/Adagrad(fused=True): regenerating the list dropped the reviewed `_fused_adamw`,
`_fused_sgd` and `_fused_adagrad` overloads (18) from server/allowed_ops.txt. (The whole regeneration, with its
OpInfo pass, takes minutes: not run here.)"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_every_fused_optimizer_overload_is_guarded_and_allowed() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_allowlist
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from gpupool.server import guards

    fused = set()
    for name in guards.FUSED_OPTIMIZERS:
        for op in (f"_fused_{name}", f"_fused_{name}_"):
            packet = getattr(torch.ops.aten, op)
            fused |= {f"aten::{op}.{overload}" for overload in packet.overloads()}
    assert len(fused) == 24, sorted(fused)  # 4 optimizers: default, out, tensor_lr, tensor_lr_out + 2 in place
    assert fused <= gen_allowlist.guarded(), sorted(fused - gen_allowlist.guarded())
    listed = {line for line in (ROOT / "server" / "allowed_ops.txt").read_text().split() if line.startswith("aten::")}
    assert fused <= listed, sorted(fused - listed)
