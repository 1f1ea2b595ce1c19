"""Run WITHOUT --cuda (plain `gpupool run`, or no gpupool at all): torch is untouched."""

import os

import torch

assert not torch.cuda.is_available()
assert torch.cuda.is_available.__module__ == "torch.cuda", torch.cuda.is_available.__module__
# `gpupool run`'s C++ client (its default) is torch's PrivateUse1 backend from `import torch` on: nothing else changes
native = os.environ.get("GPUPOOL_CLIENT") == "native"
assert torch._C._get_privateuse1_backend_name() == ("gpupool" if native else "privateuseone")
assert torch.load.__module__ == "torch.serialization"
assert not torch.overrides._get_current_function_mode_stack()
print("untouched")
