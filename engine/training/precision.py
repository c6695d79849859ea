"""Precision: fp32, bf16 autocast over fp32 master weights, or fp16 autocast with dynamic loss scaling.

fp32 is the default on CPU (and the layout-invariance and resume-exactness contracts are stated for it); bf16 is the
default on CUDA. fp16 needs CUDA and uses torch's GradScaler; under tensor parallelism an overflow in one rank's shard
must skip the step on every rank (`agree_found_inf`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from engine.config import Config, ConfigError


def resolve_dtype(cfg: Config, device: torch.device) -> str:
    if cfg.train.dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if cfg.train.dtype == "fp16" and device.type != "cuda":
        raise ConfigError("train.dtype fp16 (loss scaling) needs CUDA; use fp32 or bf16 on CPU")
    return cfg.train.dtype


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's autocast context for a resolved dtype (fp32: none)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def make_scaler(dtype: str) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (initial scale 65536, as torch's default), else None."""
    return torch.amp.GradScaler("cuda") if dtype == "fp16" else None


def agree_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, group: Any) -> None:
    """fp16 under tp: an overflow in one rank's shard must skip the step (and back off the scale) on every rank of
    the model-parallel group, or the shards of one model would diverge. GradScaler keeps the flags of `unscale_`
    per optimizer; `step` and `update` read them afterwards, so a max over the group here is what both see."""
    for found in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
