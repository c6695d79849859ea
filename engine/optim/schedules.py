"""Learning-rate schedules as pure functions of the step.

`step` counts optimizer updates already taken (0 for the first update). Warmup is linear, lr·(step+1)/warmup for
step < warmup, so the first update is not wasted at lr 0 and step warmup−1 reaches the peak. The schedule length
D is `optim.decay_steps`, or `total_steps` when that is 0; the LR depends on nothing else, so a run extended with a
larger train.steps but the same decay_steps follows the same curve (docs/contracts.md, "Resume exactness").
The floor min_lr is `min_lr_ratio`·lr, a fraction of the peak, never an absolute rate.

- cosine: after warmup, min_lr + ½(1 + cos(π·r))(lr − min_lr), r = (step − W)/(D − W), then min_lr from step D on
  (nanoGPT `get_lr`; Chinchilla App. D.1 decays 10× over the run: min_lr_ratio 0.1).
- wsd: warmup, stable at lr, then a linear decay to min_lr over the last `wsd_decay_fraction`·D steps
  (warmup-stable-decay, Hu et al. 2024 / MiniCPM, which found ~10% of the run in decay enough), then min_lr.
- inverse_sqrt: lr·min((step+1)/W, sqrt(W/(step+1))), Vaswani et al. 2017 §5.3 normalised to peak at lr
  (W = 0 behaves as W = 1: lr/sqrt(step+1)); it never ends, so D is unused.
- constant: warmup, then lr.
"""

from __future__ import annotations

import math

import torch

from engine.config import ConfigError, OptimConfig

SCHEDULES = ("cosine", "wsd", "inverse_sqrt", "constant")


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The learning rate for update number `step` (0-based) under `cfg.schedule`."""
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {'|'.join(SCHEDULES)}, got '{cfg.schedule}'")
    if cfg.warmup < 0:
        raise ConfigError(f"optim.warmup must be >= 0, got {cfg.warmup}")
    lr, warmup = cfg.lr, cfg.warmup
    min_lr = cfg.min_lr_ratio * lr
    if cfg.schedule == "inverse_sqrt":
        s = step + 1
        if s <= warmup:
            return lr * s / warmup
        return lr * math.sqrt(max(warmup, 1) / s)
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return lr
    decay = cfg.decay_steps if cfg.decay_steps > 0 else total_steps
    if decay <= 0:
        raise ConfigError(f"lr_at: schedule {cfg.schedule} needs optim.decay_steps or total_steps > 0")
    if step >= decay:
        return min_lr
    if cfg.schedule == "cosine":
        r = (step - warmup) / max(decay - warmup, 1)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * r)) * (lr - min_lr)
    # wsd
    if not 0.0 <= cfg.wsd_decay_fraction <= 1.0:
        raise ConfigError(f"optim.wsd_decay_fraction must be in [0, 1], got {cfg.wsd_decay_fraction}")
    decay_len = max(1, round(cfg.wsd_decay_fraction * decay))
    start = max(decay - decay_len, warmup)
    if step < start:
        return lr
    return lr - (lr - min_lr) * (step - start) / max(decay - start, 1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Writes lr into every param group (times the group's optional `lr_scale`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
