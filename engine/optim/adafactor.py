"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", arXiv:1804.04235).

Per step t (1-based) and parameter θ with gradient G:
- β̂2_t = 1 − t^decay_rate (decay_rate −0.8), ρ_t = min(lr, 1/√t) with relative_step, else lr;
- α_t = max(ε2, RMS(θ_{t−1}))·ρ_t with scale_parameter, else ρ_t;
- decoupled weight decay θ ← θ − lr·λ·θ (lr-coupled like torch AdamW, not through the gradient);
- matrices (the last two dims; leading dims are a batch): R_t = β̂2 R + (1−β̂2)·rowsum(G²),
  C_t = β̂2 C + (1−β̂2)·colsum(G²), V̂ = R Cᵀ / max(sum(R), ε1): O(n + m) state instead of O(nm);
  vectors and scalars: V̂ = β̂2 V̂ + (1−β̂2) G²;
- U = G / √max(V̂, ε1); update clipping Û = U / max(1, RMS(U)/d);
- optional momentum (beta1, the fairseq variant): M = β1 M + (1−β1) Û, used in place of Û;
- θ ← θ − α_t·Û.
The scheduled learning rate (engine.optim.schedules) is written into group["lr"] and caps the relative step.
State per parameter: `step` (fp32 scalar tensor), `row`/`col` or `sq`, and `exp_avg` with momentum, all fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class Adafactor(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        beta1: float | None = None,
        decay_rate: float = -0.8,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        relative_step: bool = True,
        scale_parameter: bool = True,
    ):
        if not lr > 0:
            raise ValueError(f"Adafactor: lr must be > 0, got {lr}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Adafactor: beta1 must be in [0, 1) or None, got {beta1}")
        if not decay_rate < 0:
            raise ValueError(f"Adafactor: decay_rate must be < 0 (β̂2_t = 1 − t^decay_rate), got {decay_rate}")
        if clip_threshold <= 0 or weight_decay < 0:
            raise ValueError(
                f"Adafactor: need clip_threshold > 0 and weight_decay >= 0, got {clip_threshold}, {weight_decay}"
            )
        defaults = dict(
            lr=lr,
            beta1=beta1,
            decay_rate=decay_rate,
            eps=tuple(eps),
            clip_threshold=clip_threshold,
            weight_decay=weight_decay,
            relative_step=relative_step,
            scale_parameter=scale_parameter,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _rms(x: torch.Tensor) -> torch.Tensor:
        return x.norm(2) / math.sqrt(x.numel())

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                grad = p.grad.float()
                state = self.state[p]
                factored = p.ndim >= 2
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if factored:
                        state["row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
                        state["col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32, device=p.device)
                    else:
                        state["sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if group["beta1"] is not None:
                        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"].item()
                beta2 = 1.0 - t ** group["decay_rate"]
                rho = min(group["lr"], 1.0 / math.sqrt(t)) if group["relative_step"] else group["lr"]
                p32 = p.float()
                # α as a tensor: no device-to-host sync per parameter on GPU
                alpha = self._rms(p32).clamp_min(eps2) * rho if group["scale_parameter"] else torch.tensor(rho)

                g2 = grad.square()
                if factored:
                    row, col = state["row"], state["col"]
                    row.mul_(beta2).add_(g2.sum(dim=-1), alpha=1.0 - beta2)
                    col.mul_(beta2).add_(g2.sum(dim=-2), alpha=1.0 - beta2)
                    denom = row.sum(dim=-1, keepdim=True).clamp_min(eps1)  # 1ᵀR per matrix of the batch
                    v_hat = (row / denom).unsqueeze(-1) * col.unsqueeze(-2)
                else:
                    v_hat = state["sq"].mul_(beta2).add_(g2, alpha=1.0 - beta2)
                update = grad / v_hat.clamp_min(eps1).sqrt()
                update.div_(torch.clamp(self._rms(update) / group["clip_threshold"], min=1.0))
                if group["beta1"] is not None:
                    exp_avg = state["exp_avg"]
                    exp_avg.mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
                    update = exp_avg
                if group["weight_decay"] > 0:
                    p32.mul_(1.0 - group["lr"] * group["weight_decay"])
                p32.sub_(update * alpha.to(update.device))
                if p32 is not p:
                    p.copy_(p32)
        return loss
