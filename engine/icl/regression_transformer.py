"""The engine's transformer blocks between a read-in and a read-out projection, trained on linear-regression
prompts in context (Garg et al. 2022, §2: GPT-2 with Linear(d -> d_model) in and Linear(d_model -> 1) out).

The token stream is `linear_regression.interleave(xs, ys)`; the prediction for y_i is read out at the token x_i, so
the causal model sees x_1, y_1, ..., x_{i-1}, y_{i-1}, x_i. Positions are learned (the gpt2 arch); the blocks are
`engine.model.gpt.Block`, the final norm `engine.model.layers.Norm`, initialised by `engine.model.init.init_weights`.
Every step trains on fresh prompts: no task is seen twice, so a low error is in-context learning, not memory.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import nn

from engine.config import ModelConfig
from engine.icl.linear_regression import (
    BASELINES,
    interleave,
    normalized_squared_error,
    sample_prompts,
)
from engine.model.gpt import Block, PositionEmbedding, resolve
from engine.model.init import init_weights
from engine.model.layers import Norm


class RegressionTransformer(nn.Module):
    """Real-valued tokens (b, s, d) -> a scalar per token (b, s): read_in, positions, blocks, norm, read_out."""

    def __init__(self, d: int, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        if cfg.arch != "gpt2":
            raise ValueError(f"RegressionTransformer uses learned positions: model.arch must be gpt2, got {cfg.arch!r}")
        self.cfg = cfg = resolve(cfg, tokenizer_vocab=1)
        self.read_in = nn.Linear(d, cfg.d_model)
        self.pos_emb = PositionEmbedding(cfg.seq_len, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = Norm(cfg.d_model, "layer", cfg.norm_eps, cfg.kernels)
        self.read_out = nn.Linear(cfg.d_model, 1)
        init_weights(self, seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"prompt of {s} tokens exceeds model.seq_len {self.cfg.seq_len}")
        h = self.read_in(tokens) + self.pos_emb(s)
        for block in self.layers:
            h = block(h)
        return self.read_out(self.norm(h)).squeeze(-1)

    def predict(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """(b, n): the prediction of each y_i from the prompt up to x_i."""
        return self(interleave(xs, ys))[:, ::2]


@dataclasses.dataclass
class RegressionTraining:
    """One run: d, prompt length, model shape and Adam (linear warmup, then constant or cosine-decayed lr);
    curriculum_every > 0 grows the active dimension from
    `curriculum_start` by 1 (and the prompt by 2 points) every that many steps (Garg et al.'s curriculum)."""

    d: int = 5
    n_points: int = 11  # in-context examples 0..n_points-1
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    steps: int = 500
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 50
    min_lr_ratio: float = 1.0  # < 1: cosine decay from lr to lr * min_lr_ratio after the warmup; 1: constant
    curriculum_start: int = 0  # 0: no curriculum
    curriculum_every: int = 0
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            arch="gpt2", n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads, vocab_size=1,
            seq_len=2 * self.n_points, kernels="torch", init_std=0.02,
        )

    def curriculum(self, step: int) -> tuple[int, int]:
        """(active dims, prompt points) at `step`."""
        if not (self.curriculum_start and self.curriculum_every):
            return self.d, self.n_points
        grown = step // self.curriculum_every
        dims = min(self.d, self.curriculum_start + grown)
        points = min(self.n_points, self.n_points - 2 * (self.d - dims))
        return dims, max(points, 2)

    def lr_factor(self, step: int) -> float:
        """The lr multiplier at `step`: linear warmup to 1, then a cosine down to `min_lr_ratio` at the last step."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - 1 - self.warmup)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_regression(run: RegressionTraining, log_every: int = 0) -> tuple[RegressionTransformer, list[dict]]:
    """Trains on fresh prompts each step (mean squared error over every prediction of the prompt, / d); returns the
    model and the per-step log {step, loss, dims, points, seconds}."""
    torch.manual_seed(run.seed)
    gen = torch.Generator().manual_seed(run.seed)
    model = RegressionTransformer(run.d, run.model_config(), seed=run.seed)
    opt = torch.optim.Adam(model.parameters(), lr=run.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, run.lr_factor)
    log, start = [], time.perf_counter()
    for step in range(run.steps):
        dims, points = run.curriculum(step)
        xs, ys = sample_prompts(run.batch, points, run.d, gen, active_dims=dims)
        loss = (model.predict(xs, ys) - ys).square().mean() / dims
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        record = {"step": step, "loss": loss.item(), "dims": dims, "points": points,
                  "seconds": time.perf_counter() - start}
        log.append(record)
        if log_every and (step % log_every == 0 or step == run.steps - 1):
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    return model, log


@torch.no_grad()
def evaluate_regression(
    model: RegressionTransformer, d: int, n_points: int, prompts: int = 1000, seed: int = 1234
) -> dict[str, list[float]]:
    """Normalised squared error vs in-context examples k = 0..n_points-1 on fresh prompts, for the model and for
    each baseline of `linear_regression.BASELINES`, all on the same prompts."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = sample_prompts(prompts, n_points, d, gen)
    model.eval()
    curves = {"transformer": normalized_squared_error(model.predict(xs, ys), ys, d).tolist()}
    model.train()
    for name, baseline in BASELINES.items():
        curves[name] = normalized_squared_error(baseline(xs, ys), ys, d).tolist()
    return curves
