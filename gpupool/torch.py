"""`import gpupool.torch` registers the PyTorch device `gpupool`; the API lives in gpupool.client.torch."""

from gpupool.client.torch import *  # noqa: F403
from gpupool.client.torch import __all__  # noqa: F401
