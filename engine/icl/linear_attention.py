"""One linear self-attention layer vs one gradient-descent step (von Oswald et al. 2023, arXiv:2212.07677, §2).

Tokens e_i = (x_i, y_i) in R^{d+1} for the N context points and e_q = (x_q, 0) for the query. A linear self-attention
layer (no softmax, one head) updates the query as

    e_q <- e_q + (1/N) sum_i W_PV e_i (e_i^T W_KQ e_q),

and its prediction is the y coordinate of the updated query. One GD step on L(w) = 1/(2N) sum_i (w.x_i - y_i)^2
from w0 = 0 with learning rate eta gives w1 = (eta/N) sum_i y_i x_i and predicts y_hat = w1.x_q. The layer computes
exactly that with W_KQ = [[I, 0], [0, 0]] and W_PV = [[0, 0], [0, eta]] (the paper's construction, Prop. 1);
von Oswald et al. show a trained layer lands on it. `compare_to_gd` measures how close a trained layer is: the
prediction difference, the cosine between the sensitivities d y_hat / d x_q of the two models (the paper's
"interpolated" metrics, Fig. 2) and how much of the layer's effective weight lies off the construction's pattern.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


def sample_tasks(
    batch: int, n_context: int, d: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Context xs (b, N, d), ys (b, N) and query xq (b, d), yq (b): x ~ U(-1, 1)^d, w ~ N(0, I) (the paper's)."""
    if batch < 1 or n_context < 1 or d < 1:
        raise ValueError(f"sample_tasks needs positive sizes, got {batch=} {n_context=} {d=}")
    x = torch.rand(batch, n_context + 1, d, generator=generator) * 2 - 1
    w = torch.randn(batch, d, generator=generator)
    y = torch.einsum("bnd,bd->bn", x, w)
    return x[:, :-1], y[:, :-1], x[:, -1], y[:, -1]


class LinearSelfAttention(nn.Module):
    """A single linear self-attention head on tokens (x, y) of width d+1, with the key-query and projection-value
    products as single matrices W_KQ and W_PV (the form the paper analyses); returns the query's prediction."""

    def __init__(self, d: int, init_std: float = 1e-2, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w_kq = nn.Parameter(torch.randn(d + 1, d + 1, generator=gen) * init_std)
        self.w_pv = nn.Parameter(torch.randn(d + 1, d + 1, generator=gen) * init_std)

    def forward(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        e = torch.cat((xs, ys[..., None]), -1)  # (b, N, d+1)
        eq = torch.cat((xq, torch.zeros_like(xq[:, :1])), -1)  # (b, d+1), the query's y unknown
        scores = e @ (self.w_kq @ eq[..., None])  # (b, N, 1): e_i^T W_KQ e_q
        update = (e @ self.w_pv.T * scores).mean(1)  # (1/N) sum_i W_PV e_i (e_i^T W_KQ e_q)
        return (eq + update)[:, -1]


def gd_predictions(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, eta: float | torch.Tensor) -> torch.Tensor:
    """y_hat = w1.x_q with w1 = (eta/N) sum_i y_i x_i: one GD step on the in-context least-squares loss from w0 = 0."""
    return eta * torch.einsum("bn,bnd,bd->b", ys, xs, xq) / xs.shape[1]


def optimal_gd_learning_rate(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> float:
    """The eta minimising the mean squared error of `gd_predictions` on these tasks. The prediction is eta * a with
    a = gd_predictions(..., 1), so the loss is quadratic in eta: eta* = E[a yq] / E[a^2] (closed-form line search)."""
    a = gd_predictions(xs, ys, xq, 1.0)
    return float((a * yq).mean() / a.square().mean())


@dataclasses.dataclass
class LSATraining:
    d: int = 10
    n_context: int = 10
    steps: int = 2000
    batch: int = 512
    lr: float = 3e-3
    seed: int = 0


def train_lsa(run: LSATraining) -> tuple[LinearSelfAttention, list[float]]:
    """Adam on the squared error of the query prediction, fresh tasks each step; returns the layer and the losses."""
    gen = torch.Generator().manual_seed(run.seed)
    layer = LinearSelfAttention(run.d, seed=run.seed)
    opt = torch.optim.Adam(layer.parameters(), lr=run.lr)
    losses = []
    for _ in range(run.steps):
        xs, ys, xq, yq = sample_tasks(run.batch, run.n_context, run.d, gen)
        loss = 0.5 * (layer(xs, ys, xq) - yq).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return layer, losses


def effective_gd_weights(layer: LinearSelfAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, off): the layer's query-y output is (1/N) sum_i (p.e_i)(e_i^T A x_q) with p the y row of W_PV and A the
    first d columns of W_KQ; its GD-like part is M = p_y A_xx (d x d; the construction has M = eta I) and `off`
    stacks the remaining coefficients (p_x and A's y row: zero in the construction)."""
    p = layer.w_pv[-1]
    a = layer.w_kq[:, :-1]
    d = a.shape[1]
    m = p[-1] * a[:d]
    off = torch.cat((torch.outer(p[:d], a[d]).reshape(-1), (p[:d, None] * a[:d]).reshape(-1), p[-1] * a[d]))
    return m.detach(), off.detach()


def compare_to_gd(layer: LinearSelfAttention, eta: float, d: int, n_context: int, tasks: int = 2000,
                  seed: int = 1234) -> dict[str, float]:
    """On fresh tasks: both losses, the mean squared prediction difference, the mean cosine between the
    sensitivities d y_hat / d x_q of the layer and of the GD step, and the layer's weights vs the construction
    (M's mean diagonal vs eta, relative norm of M's off-diagonal and of the off-pattern coefficients)."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys, xq, yq = sample_tasks(tasks, n_context, d, gen)
    xq = xq.clone().requires_grad_(True)
    pred_lsa = layer(xs, ys, xq)
    (grad_lsa,) = torch.autograd.grad(pred_lsa.sum(), xq)  # tasks are independent: row b is d y_hat_b / d xq_b
    pred_gd = gd_predictions(xs, ys, xq, eta)
    (grad_gd,) = torch.autograd.grad(pred_gd.sum(), xq)
    m, off = effective_gd_weights(layer)
    diag = m.diagonal().mean()
    return {
        "loss_lsa": 0.5 * (pred_lsa - yq).square().mean().item(),
        "loss_gd": 0.5 * (pred_gd - yq).square().mean().item(),
        "prediction_difference": (pred_lsa - pred_gd).square().mean().item(),
        "sensitivity_cosine": torch.nn.functional.cosine_similarity(grad_lsa, grad_gd, dim=-1).mean().item(),
        "eta": eta,
        "lsa_eta": diag.item(),
        "offdiag_relative": ((m - torch.diag(m.diagonal())).norm() / (diag.abs() * d**0.5)).item(),
        "offpattern_relative": (off.norm() / (diag.abs() * d**0.5)).item(),
    }
