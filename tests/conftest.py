"""Test setup: the Triton interpreter on machines without CUDA, and the `gpu` marker's skip."""

import os

import pytest


def _cuda_available() -> bool:
    # Ask torch before triton is imported anywhere: TRITON_INTERPRET must be set before that import.
    import torch

    return torch.cuda.is_available()


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep test runs small and quiet on 2 cores; spawned children inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
