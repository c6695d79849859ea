"""Induction-head emergence tracked by the ICL score (Olsson et al. 2022, "In-context Learning and Induction Heads").

The ICL score is the mean loss at the 500th token minus the mean loss at the 50th token of a 512-token context
(nats; more negative: later tokens profit more from the context). On sequences whose later part repeats their
earlier part, a model without induction heads ([A][B] ... [A] -> [B]) predicts both tokens equally badly and
scores about 0; once the heads form, the repeated tokens are copied and the score drops towards -ln(vocab) in a
short window of training: the phase change.

Data: each sequence is a random segment of uniform tokens with a random period L in [seq/4, seq/2], tiled to the
sequence length, so the 50th token lies in the first copy and the 500th in a repeat (for seq 512), and a fixed
positional offset cannot stand in for matching the previous occurrence. The model is the engine's GPT
(engine.model.gpt, llama arch: rotary positions), trained on next-token prediction.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.model.gpt import GPT


def repeated_sequences(batch: int, seq_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, seq_len) token ids: a uniform random segment of period L ~ U[seq/4, seq/2], tiled."""
    if seq_len < 8 or vocab < 2:
        raise ValueError(f"repeated_sequences needs seq_len >= 8 and vocab >= 2, got {seq_len=} {vocab=}")
    out = torch.empty(batch, seq_len, dtype=torch.long)
    periods = torch.randint(seq_len // 4, seq_len // 2 + 1, (batch,), generator=generator)
    for b, period in enumerate(periods.tolist()):
        segment = torch.randint(0, vocab, (period,), generator=generator)
        out[b] = segment.repeat(-(-seq_len // period))[:seq_len]
    return out


def per_token_loss(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    """(seq_len - 1,): the mean next-token loss at each position over the batch; entry t is the loss of predicting
    token t+2 (1-based) from tokens 1..t+1."""
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return loss.view(tokens.shape[0], -1).mean(0)


def icl_score(losses: torch.Tensor, early: int = 50, late: int = 500) -> float:
    """Loss of the `late`-th token minus loss of the `early`-th token (1-based token indices) from `per_token_loss`
    output (whose entry i scores token i+2)."""
    if not 2 <= early < late <= losses.shape[0] + 1:
        raise ValueError(f"icl_score needs 2 <= early < late <= {losses.shape[0] + 1}, got {early=} {late=}")
    return (losses[late - 2] - losses[early - 2]).item()


@dataclasses.dataclass
class InductionTraining:
    seq_len: int = 512
    vocab: int = 64
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    steps: int = 600
    batch: int = 8
    lr: float = 1e-3
    eval_every: int = 25
    eval_batch: int = 32
    early: int = 50  # token indices of the score (1-based)
    late: int = 500
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            arch="llama", n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads, vocab_size=self.vocab,
            seq_len=self.seq_len, kernels="torch", tie_embeddings=False,
        )


def train_induction(run: InductionTraining, log: bool = False) -> tuple[GPT, list[dict]]:
    """Trains on fresh repeated sequences; every `eval_every` steps (and at step 0 and the end) records
    {step, tokens, train_loss, icl_score, loss_early, loss_late, seconds} on one fixed evaluation batch."""
    torch.manual_seed(run.seed)
    gen = torch.Generator().manual_seed(run.seed)
    eval_tokens = repeated_sequences(run.eval_batch, run.seq_len, run.vocab, torch.Generator().manual_seed(10**6))
    model = GPT(run.model_config(), seed=run.seed)
    opt = torch.optim.Adam(model.parameters(), lr=run.lr)
    history, start, train_loss = [], time.perf_counter(), math.log(run.vocab)
    for step in range(run.steps + 1):
        if step % run.eval_every == 0 or step == run.steps:
            model.eval()
            with torch.no_grad():
                losses = per_token_loss(model, eval_tokens)
            model.train()
            record = {
                "step": step, "tokens": step * run.batch * (run.seq_len - 1), "train_loss": train_loss,
                "icl_score": icl_score(losses, run.early, run.late), "loss_early": losses[run.early - 2].item(),
                "loss_late": losses[run.late - 2].item(), "seconds": time.perf_counter() - start,
            }
            history.append(record)
            if log:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if step == run.steps:
            break
        tokens = repeated_sequences(run.batch, run.seq_len, run.vocab, gen)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_loss = loss.item()
    return model, history
