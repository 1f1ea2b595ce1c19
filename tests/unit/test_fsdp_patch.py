"""client/fsdp.py: torch's FSDP2 init is patched when it was imported before gpupool's backend registered (a script's
`from torch.distributed.fsdp import fully_shard` first, then `import gpupool.torch`), in a fresh interpreter (what is
imported is the point), and the patches leave CPU tensors to torch. The other order (the import hook: under `--cuda`
the mapping installs at `import torch`, before the script imports FSDP), the moves and the freed storages on gpupool
itself run through real daemons in tests/integration/test_cuda_scripts.py (FSDP2, both clients)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys, torch
{first}
{second}
from torch.distributed.fsdp._fully_shard import _fsdp_init, _fsdp_param, _fsdp_param_group
assert _fsdp_init._move_states_to_device._gpupool and _fsdp_param.free_storage._gpupool
assert _fsdp_param.alloc_storage._gpupool and _fsdp_param_group.alloc_storage._gpupool  # imported there by name
fsdp.install()  # idempotent: wrapped once
assert not hasattr(_fsdp_param.free_storage.__wrapped__, "_gpupool")
t = torch.ones(4)
_fsdp_param.free_storage(t)  # a CPU tensor: torch's own, its storage freed
assert t.untyped_storage().size() == 0
_fsdp_param_group.alloc_storage(t)  # and back, torch's own
assert t.untyped_storage().size() == 16
params, buffers = [torch.nn.Parameter(torch.ones(2))], [torch.zeros(2)]
_fsdp_init._move_states_to_device(params, buffers, torch.device("cpu"))  # onto the CPU: torch's own, no swap
assert params[0].device.type == "cpu" and type(params[0]) is torch.nn.Parameter
print("ok")
"""
IMPORT_FSDP = "import torch.distributed.fsdp"
INSTALL = "from gpupool.client import fsdp; fsdp.install()"


def test_fsdp_init_imported_first_is_patched_and_leaves_cpu_tensors_to_torch() -> None:
    code = CHECK.format(first=IMPORT_FSDP, second=INSTALL)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
