"""Where a run computes: the device of this rank and the CPU thread count."""

from __future__ import annotations

import os

import torch

from engine.config import Config, ConfigError


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no CUDA device is available; use --train.device auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_threads(cfg: Config) -> int:
    """Intra-op threads for CPU training: train.threads, else OMP_NUM_THREADS, else half the cores per process.

    Half, because CPU training here mostly runs on small shared machines: on the 2-core box, with other jobs
    running, a tiny-model step took a median 0.38 s with 2 threads and 0.61 s with 1, but a mean of 1.11 s vs
    0.61 s: a descheduled thread stalls every parallel op, and those stalls dominate the run time. On an idle machine
    `--train.threads` can claim every core. torchrun sets OMP_NUM_THREADS=1 for more than one process per node.
    """
    if cfg.train.threads > 0:
        return cfg.train.threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, (os.cpu_count() or 1) // local // 2)
