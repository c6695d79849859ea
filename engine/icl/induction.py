"""Induction-head emergence and the ICL score (Olsson et al. 2022, "In-context Learning and Induction Heads").

The ICL score is the mean loss at a late token minus the mean loss at an early token of the context (Olsson et al.
use tokens 500 and 50 of 512; here the positions scale with the sequence). On sequences whose later part repeats
their earlier part, a model without induction heads ([A][B] ... [A] -> [B]) predicts both tokens about equally badly
and scores about 0; once the heads form, the repeated tokens are copied and the score drops towards -ln(vocab) in a
short window of training: the phase change.

Data: each sequence is a random segment of uniform tokens with a random period L in [seq/4, seq/2], tiled to the
sequence length, so the early token lies in the first copy and the late one in a repeat, and no fixed positional
offset can stand in for finding the previous occurrence. The model is the engine's GPT (llama arch: rotary
positions) trained on next-token prediction.

Mechanism: an induction head in layer 2 attends from a repeated token to the token that followed its earlier
occurrence and copies it; it finds that token through a previous-token head in layer 1 (K-composition). Both are
measured from the attention probabilities, recomputed by forward hooks on each layer's attention core from the
queries and keys it receives: the model holds no probe code.
- induction (prefix-matching) score of a head: its mean attention, over queries in a repeat, on the keys that
  followed earlier occurrences of the query's token (Olsson et al.'s prefix-matching score);
- previous-token score of a head: its mean attention on the key just before the query.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.model.gpt import GPT


def repeated_sequences(
    batch: int, seq_len: int, vocab: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """((batch, seq_len) token ids, (batch,) periods): a uniform random segment of period L ~ U[seq/4, seq/2],
    tiled."""
    if seq_len < 8 or vocab < 2:
        raise ValueError(f"repeated_sequences needs seq_len >= 8 and vocab >= 2, got {seq_len=} {vocab=}")
    out = torch.empty(batch, seq_len, dtype=torch.long)
    periods = torch.randint(seq_len // 4, seq_len // 2 + 1, (batch,), generator=generator)
    for b, period in enumerate(periods.tolist()):
        segment = torch.randint(0, vocab, (period,), generator=generator)
        out[b] = segment.repeat(-(-seq_len // period))[:seq_len]
    return out, periods


def per_token_loss(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    """(batch, seq_len - 1): the next-token loss at each position; entry t is the loss of predicting token t+2
    (1-based) from tokens 1..t+1."""
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return loss.view(tokens.shape[0], -1)


def icl_score(losses: torch.Tensor, early: int = 50, late: int = 500) -> float:
    """Loss of the `late`-th token minus loss of the `early`-th token (1-based token indices) from the batch mean of
    `per_token_loss` output (whose entry i scores token i+2)."""
    if not 2 <= early < late <= losses.shape[0] + 1:
        raise ValueError(f"icl_score needs 2 <= early < late <= {losses.shape[0] + 1}, got {early=} {late=}")
    return (losses[late - 2] - losses[early - 2]).item()


def repeated_targets(periods: torch.Tensor, n_targets: int) -> torch.Tensor:
    """(batch, n_targets) bool: whether `per_token_loss` entry t predicts a token that repeats an earlier one (0-based
    token t+1 >= its sequence's period): the part of the sequence only copying from the context can predict."""
    return torch.arange(1, n_targets + 1)[None, :] >= periods[:, None]


@contextlib.contextmanager
def capturing_attention(model: GPT) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every forward pass stores each layer's attention probabilities (batch, heads, query, key)
    in the yielded dict under the 1-based layer index. They are recomputed from the (rotated) queries and keys that
    the layer's softmax core receives: softmax(q k^T / sqrt(d)) under the causal mask, as the core computes them
    (causal self-attention, one key/value head per query head)."""
    probs: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            q, k = args[0].float(), args[1].float()  # (b, s, h, d)
            if k.shape[2] != q.shape[2]:
                raise ValueError("capturing_attention needs as many key heads as query heads (no grouped-query)")
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
            s = q.shape[1]
            future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
            probs[layer] = scores.masked_fill(future, float("-inf")).softmax(-1)

        return hook

    handles = [block.attn.core.register_forward_hook(capture(i + 1)) for i, block in enumerate(model.layers.values())]
    try:
        yield probs
    finally:
        for h in handles:
            h.remove()


def induction_targets(periods: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(batch, seq_len, seq_len) bool, [b, i, j]: key j is a token that followed an earlier occurrence of query i's
    token (1 <= j = i + 1 - m·L for some m >= 1, L the period); rows of queries in the first copy are all False."""
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    L = periods[:, None, None]
    return (j >= 1) & (j <= i - L + 1) & ((i + 1 - j) % L == 0)


def induction_scores(probs: torch.Tensor, periods: torch.Tensor) -> torch.Tensor:
    """(heads,): each head's mean attention, over queries in a repeat, on the keys that followed earlier occurrences
    of the query's token (the prefix-matching score; 1 is a perfect induction head). probs: (b, h, s, s)."""
    s = probs.shape[-1]
    targets = induction_targets(periods, s)  # (b, s, s)
    on_target = (probs * targets[:, None]).sum(-1)  # (b, h, s)
    queries = (torch.arange(s)[None, :] >= periods[:, None])[:, None]  # (b, 1, s): queries in a repeat
    return (on_target * queries).sum((0, 2)) / queries.sum()


def previous_token_scores(probs: torch.Tensor) -> torch.Tensor:
    """(heads,): each head's mean attention on the key just before the query (queries 2..s). probs: (b, h, s, s)."""
    return probs.diagonal(-1, -2, -1).mean((0, 2))


@dataclasses.dataclass
class InductionTraining:
    """One run's shape and budget. The defaults show the phase change on 2 CPU cores in about 1.5 minutes
    (docs/icl.md: seeds 0-3 change between steps 650 and 950); the 300-step warmup keeps a seed from settling on
    uniform predictions, as seed 2 did with 100."""

    seq_len: int = 128
    vocab: int = 64
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    steps: int = 1500
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 300  # steps of linear learning-rate warmup, then constant
    weight_decay: float = 0.0
    eval_every: int = 25
    eval_batch: int = 64
    early: int = 12  # token indices of the score (1-based): Olsson et al.'s 50 and 500 of 512, scaled
    late: int = 125
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            arch="llama", n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads, vocab_size=self.vocab,
            seq_len=self.seq_len, kernels="torch", tie_embeddings=False,
        )


@torch.no_grad()
def evaluate_induction(model: GPT, tokens: torch.Tensor, periods: torch.Tensor, early: int, late: int) -> dict:
    """One forward pass over an evaluation batch: {repeat_loss (mean loss on tokens that repeat an earlier one),
    first_copy_loss (on tokens of the first copy, which no model can predict better than ln V), icl_score,
    loss_early, loss_late, induction_score (layer 2's best head; 0 for a 1-layer model), previous_token_score
    (layer 1's best head), and per-head lists}."""
    was_training = model.training
    model.eval()
    with capturing_attention(model) as probs:
        losses = per_token_loss(model, tokens)
    model.train(was_training)
    repeats = repeated_targets(periods, losses.shape[1])
    mean = losses.mean(0)
    induction = [induction_scores(p, periods).tolist() for p in probs.values()]
    previous = [previous_token_scores(p).tolist() for p in probs.values()]
    return {
        "repeat_loss": losses[repeats].mean().item(), "first_copy_loss": losses[~repeats].mean().item(),
        "icl_score": icl_score(mean, early, late), "loss_early": mean[early - 2].item(),
        "loss_late": mean[late - 2].item(), "induction_score": max(induction[1]) if len(induction) > 1 else 0.0,
        "previous_token_score": max(previous[0]), "induction_by_head": induction, "previous_token_by_head": previous,
    }


def train_induction(run: InductionTraining, log: bool = False) -> tuple[GPT, list[dict]]:
    """Trains on fresh repeated sequences with Adam(W) after a linear warmup; every `eval_every` steps (and at step 0
    and the end) records {step, tokens, train_loss, seconds} and `evaluate_induction`'s figures on one fixed
    evaluation batch."""
    if not 2 <= run.early < run.late <= run.seq_len:
        raise ValueError(f"need 2 <= early < late <= seq_len, got {run.early}, {run.late}, {run.seq_len}")
    torch.manual_seed(run.seed)
    gen = torch.Generator().manual_seed(run.seed)
    eval_tokens, eval_periods = repeated_sequences(
        run.eval_batch, run.seq_len, run.vocab, torch.Generator().manual_seed(10**6)
    )
    model = GPT(run.model_config(), seed=run.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(run.warmup, 1)))
    history, start, train_loss = [], time.perf_counter(), math.log(run.vocab)
    for step in range(run.steps + 1):
        if step % run.eval_every == 0 or step == run.steps:
            record = {"step": step, "tokens": step * run.batch * (run.seq_len - 1), "train_loss": train_loss}
            record |= evaluate_induction(model, eval_tokens, eval_periods, run.early, run.late)
            record["seconds"] = time.perf_counter() - start
            history.append(record)
            if log:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                               if not k.endswith("_by_head")), flush=True)
        if step == run.steps:
            break
        tokens, _ = repeated_sequences(run.batch, run.seq_len, run.vocab, gen)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_loss = loss.item()
    return model, history


def phase_change(history: list[dict], key: str = "repeat_loss", span: int = 1) -> dict:
    """Where `key` fell fastest: the stretch of `span` evaluation intervals over which it fell most. Returns {step
    (the stretch's middle), from_step, to_step, before, after (its values at both ends), fall (before - after),
    fall_before (its fall over the `span` intervals just before: the plateau's drift), start, end (the first and
    the last evaluation's values)}. A phase change is a fall many times the drift before it."""
    if len(history) < 2 * span + 1 or span < 1:
        raise ValueError(f"phase_change needs span >= 1 and at least 2 * span + 1 evaluations, got {span=} and "
                         f"{len(history)}")
    values = [h[key] for h in history]
    i = max(range(span, len(values) - span), key=lambda i: values[i] - values[i + span])
    a, b = history[i]["step"], history[i + span]["step"]
    return {
        "step": (a + b) // 2, "from_step": a, "to_step": b, "before": values[i], "after": values[i + span],
        "fall": values[i] - values[i + span], "fall_before": values[i - span] - values[i], "start": values[0],
        "end": values[-1],
    }
