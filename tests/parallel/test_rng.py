"""The tp dropout stream's generator states."""

import subprocess
import sys

import pytest

BEFORE_CUDA_INIT = """
import torch
from engine.parallel.rng import RNGStatesTracker

torch.manual_seed(0)
assert not torch.cuda.is_initialized()
tracker = RNGStatesTracker()
tracker.add("tp", 123)  # made before the first CUDA call, as a model built on CPU and moved later
with tracker.fork("tp"):
    forked = torch.rand(4, device="cuda")
default = torch.rand(4, device="cuda")
torch.cuda.manual_seed(123)
assert torch.equal(forked, torch.rand(4, device="cuda")), "the fork did not draw from the tracked CUDA stream"
assert not torch.equal(forked, default)
"""


@pytest.mark.gpu
def test_tracker_made_before_cuda_init_owns_its_cuda_stream():
    """A tracker added before CUDA was initialised must still switch the CUDA generator in `fork` (dropout on the
    GPU would otherwise draw the same masks on every tp rank)."""
    out = subprocess.run([sys.executable, "-c", BEFORE_CUDA_INIT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
