"""Multi-token prediction (`--train.objective mtp`): a GPT with D extra modules that predict tokens further ahead.

Sequential modules (DeepSeek-V3 technical report, arXiv 2412.19437, sec. 2.2): module k = 1..D at position i takes
the previous depth's hidden state h^{k-1}_i (h^0: the main model's last layer, before the output head's norm) and the
shared embedding of token t_{i+k}, RMS-normalises both, concatenates them and projects 2d -> d (M_k, eq. 21), runs
one transformer block (the engine's `Block`, eq. 22) and predicts t_{i+k+1} through the shared output head (eq. 23).
The training loss is L_main + (lambda / D) * sum_k L_k (eqs. 24-25). DeepSeek-V3 averages each L_k over the T
positions of the sequence (not T - k); here every term is a sum of per-token losses that the trainer divides by the
main objective's loss-bearing tokens of the global batch, which is that normalisation. Positions whose target lies
past the sequence end carry no loss.

Parallel heads (`[objective] mtp_kind = "parallel"`; Gloeckle et al. 2024, "Better & Faster Large Language Models via
Multi-token Prediction", arXiv 2404.19737, sec. 2): head k = 1..D is one transformer block on the shared trunk's
output h^0 (not on the previous head's), predicting t_{i+k+1} through the shared output head; the main model's head
is their next-token head. The same loss form applies (lambda = D gives the paper's unweighted sum). Their
memory-saving backward (sec. 2, Fig. 2) is `per_head_backward`: each head's forward and backward in turn on a
detached copy of h^0 whose gradient accumulates, then one backward through the trunk, so only one head's logits are
alive at a time.

The model stays plain (no parallelism inside): `engine.parallel.parallelize` converts the modules' blocks with the same
tensor-parallel plan as the trunk's (under sequence parallelism the modules run on the rank's sequence shard, their
replicated norms and projection summing partial gradients over tp) and gives them the context-parallel attention; under
context parallelism each depth's ids and labels come shifted before the cut into chunks (`mtp_ids`, `mtp_labels`:
engine.training.samples.collate). Under pipeline parallelism the modules sit on the last stage, beside the output head
they share, as in DeepSeek-V3 and Megatron-Core: that stage holds a copy of the token embedding for the sequential kind
(`mtp_emb`, the embedding's one name in checkpoints, its gradient summed with the first stage's like a tied output
weight's) and takes the micro-batch's token ids as `input_ids`. In eval mode, or without targets, the forward is the
main model's alone, so a validation loss is the next-token loss, comparable with a clm run's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from engine.config import Config, ConfigError, ModelConfig
from engine.model.encoder_decoder import EncoderDecoder
from engine.model.gpt import GPT, Block
from engine.model.head import IGNORE_INDEX
from engine.model.layers import Norm

MTP_KINDS = ("sequential", "parallel")


class MTPModule(nn.Module):
    """One sequential MTP depth: RMSNorm(h) and RMSNorm(emb) concatenated, projected 2d -> d, one transformer block.
    `cfg` must be resolved."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_norm = Norm(cfg.d_model, "rms", cfg.norm_eps, cfg.kernels)
        self.embed_norm = Norm(cfg.d_model, "rms", cfg.norm_eps, cfg.kernels)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos, sin, mask, causal, **attention_kw) -> torch.Tensor:
        # The projection's output joins the residual stream in its dtype (fp32 under autocast, as the trunk's):
        # left in autocast's bf16, the block's residual sums and the head's norm would run in bf16.
        x = self.proj(torch.cat([self.hidden_norm(h), self.embed_norm(emb)], dim=-1)).to(h.dtype)
        return self.block(x, cos, sin, mask, causal, **attention_kw)


class ParallelHead(nn.Module):
    """One parallel prediction head (Gloeckle et al. 2024): a transformer block on the trunk's hidden states. The block
    sits under `block`, as an MTPModule's, so both kinds share one tensor-parallel plan entry."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.block = Block(cfg)

    def forward(self, h: torch.Tensor, cos, sin, mask, causal, **attention_kw) -> torch.Tensor:
        return self.block(h, cos, sin, mask, causal, **attention_kw)


def shift_left(t: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """`t` (b, s) moved k positions left, the last k positions set to `fill`: position i holds t[i + k]."""
    out = torch.full_like(t, fill)
    if k < t.shape[1]:
        out[:, : t.shape[1] - k] = t[:, k:]
    return out


class MultiTokenGPT(GPT):
    """A GPT with `depth` MTP modules of `kind` (`self.mtp`, named `mtp.<k-1>.*` in the state dict) sharing its token
    embedding and output head; `weight` is lambda. The main model's parameters, names and initialisation are those of
    GPT(cfg) with the same seed: a checkpoint's tensors without the `mtp.` ones are a plain GPT's."""

    def __init__(
        self, cfg: ModelConfig, depth: int = 1, weight: float = 0.3, kind: str = "sequential", seed: int | None = None
    ):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"objective.mtp_depth must be a positive integer, got {depth!r}")
        if not 0.0 <= weight:
            raise ConfigError(f"objective.mtp_lambda must be >= 0, got {weight!r}")
        if kind not in MTP_KINDS:
            raise ConfigError(f"objective.mtp_kind must be one of {'|'.join(MTP_KINDS)}, got {kind!r}")
        self._mtp_depth, self.mtp_kind = depth, kind  # read by _build, which GPT.__init__ calls
        super().__init__(cfg, seed)
        self.mtp_weight = float(weight)

    def _build(self, cfg: ModelConfig) -> None:
        super()._build(cfg)
        module = MTPModule if self.mtp_kind == "sequential" else ParallelHead
        self.mtp = nn.ModuleList(module(cfg) for _ in range(self._mtp_depth))

    @property
    def mtp_depth(self) -> int:
        return len(self.mtp)

    @property
    def tied_aliases(self) -> dict[str, str]:
        """GPT's, plus the last pipeline stage's copy of the embedding the sequential modules read."""
        extra = {"mtp_emb.weight": "tok_emb.weight"} if self.mtp_kind == "sequential" else {}
        return {**super().tied_aliases, **extra}

    @property
    def takes_input_ids(self) -> bool:
        """A last pipeline stage whose sequential modules embed token ids it does not receive as its input."""
        return self.tok_emb is None and self.mtp is not None and self.mtp_kind == "sequential"

    def _embedding(self) -> nn.Module:
        return self.tok_emb if self.tok_emb is not None else self.mtp_emb

    def mtp_hidden_states(
        self, h: torch.Tensor, tokens: torch.Tensor | None, mask=None, causal: bool = True,
        mtp_ids: torch.Tensor | None = None, **attention_kw,
    ) -> list[torch.Tensor]:  # fmt: skip
        """h^1..h^D (each (b, s, d), before the output head's norm) from the main model's h^0 = `h` and its input
        `tokens` (b, s). Sequential: depth k at position i sees h^{k-1} and the embedding of t_{i+k} (positions past
        the end get token 0, whose predictions carry no loss and, attention being causal, reach no earlier position).
        Parallel: head k sees h^0 alone."""
        out, x = [], h
        for head in self.depth_heads(h, tokens, mask, causal, mtp_ids, **attention_kw):
            x = head(h if self.mtp_kind == "parallel" else x)
            out.append(x)
        return out

    def depth_heads(
        self, h: torch.Tensor, tokens: torch.Tensor | None, mask=None, causal: bool = True,
        mtp_ids: torch.Tensor | None = None, **attention_kw,
    ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:  # fmt: skip
        """Depth k's hidden states as a function of its input hidden states, k = 1..D in turn: h^{k-1} for the
        sequential kind (each function is called on the previous one's output), h^0 for the parallel one. `tokens`
        (b, s): the token ids, or None with `mtp_ids` (b, D, s): the ids depth k embeds, mtp_ids[:, k - 1] (default:
        `tokens` shifted k left); given where a rank holds only chunks of the sequence (context parallelism), so the
        shift is made before the cut."""
        rope = (self.rope_cos, self.rope_sin)
        for k, module in enumerate(self.mtp, start=1):
            if self.mtp_kind == "parallel":
                yield lambda x, m=module: m(x, *rope, mask, causal, **attention_kw)
            else:
                ids = shift_left(tokens, k, 0) if mtp_ids is None else mtp_ids[:, k - 1]
                emb = self._embedding()(ids)
                yield lambda x, m=module, e=emb: m(x, e, *rope, mask, causal, **attention_kw)

    def mtp_loss_sums(
        self, tokens: torch.Tensor, targets: torch.Tensor, mask=None, causal: bool = True,
        input_ids: torch.Tensor | None = None, mtp_ids: torch.Tensor | None = None,
        mtp_labels: torch.Tensor | None = None, **attention_kw,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """(the main loss, [L_1 .. L_D]) as sums of per-token cross-entropies: L_k of depth k's prediction of
        t_{i+k+1} = targets[i + k] (positions with i + k past the end, or an ignored target, carry none). On a last
        pipeline stage `tokens` are the previous stage's hidden states and `input_ids` the micro-batch's token ids.
        `mtp_ids`, `mtp_labels` (b, D, s): each depth's ids and targets, shifted before a context-parallel cut."""
        if input_ids is None and mtp_ids is None:
            if self.takes_input_ids:
                raise ValueError("a last pipeline stage with sequential MTP modules needs the token ids (input_ids)")
            input_ids = tokens
        h = self.hidden_states(tokens, mask, causal, **attention_kw)
        main = self.output(h, targets, "sum")
        depths = self.mtp_hidden_states(h, input_ids, mask, causal, mtp_ids, **attention_kw)
        labels = [shift_left(targets, k, IGNORE_INDEX) if mtp_labels is None else mtp_labels[:, k - 1]
                  for k in range(1, len(depths) + 1)]  # fmt: skip
        return main, [self.output(hk, y, "sum") for hk, y in zip(depths, labels, strict=True)]

    @torch.no_grad()
    def all_logits(self, tokens: torch.Tensor, mask=None, causal: bool = True, **attention_kw) -> list[torch.Tensor]:
        """[main logits, depth 1 .. D logits], each (b, s, vocab): at position i, entry k predicts t_{i+k+1}."""
        h = self.hidden_states(tokens, mask, causal, **attention_kw)
        return [self.output(x) for x in (h, *self.mtp_hidden_states(h, tokens, mask, causal, **attention_kw))]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                causal: bool = True, reduction: str = "mean", **attention_kw) -> torch.Tensor:  # fmt: skip
        """As GPT.forward; in train mode with targets, the MTP objective L_main + (lambda / D) sum_k L_k, each term a
        sum of per-token losses ("sum"), or that sum over the main loss's tokens ("mean"). Keywords: `input_ids`, the
        token ids, for a last pipeline stage (`takes_input_ids`); `mtp_ids` and `mtp_labels`, each depth's shifted ids
        and targets, under context parallelism (`mtp_loss_sums`)."""
        shifted = {key: attention_kw.pop(key, None) for key in ("input_ids", "mtp_ids", "mtp_labels")}
        if targets is None or not self.training or self.mtp is None:  # or a pipeline stage before the last
            return super().forward(tokens, targets, mask, causal, reduction, **attention_kw)
        main, depths = self.mtp_loss_sums(tokens, targets, mask, causal, **shifted, **attention_kw)
        total = main + self.mtp_weight / len(depths) * torch.stack(depths).sum()
        if reduction == "sum":
            return total
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def build_gpt(model_cfg: ModelConfig, cfg: Config) -> GPT:
    """The model a run trains: the encoder-decoder under `--model.arch t5`, a MultiTokenGPT under
    `--train.objective mtp` (with [objective] mtp_depth, mtp_lambda and mtp_kind), else GPT."""
    if model_cfg.arch == "t5":
        return EncoderDecoder(model_cfg)
    if cfg.train.objective != "mtp":
        return GPT(model_cfg)
    o = cfg.objective
    return MultiTokenGPT(model_cfg, o.mtp_depth, o.mtp_lambda, o.mtp_kind)


def per_head_backward(
    model: MultiTokenGPT,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    backward: Callable[[torch.Tensor], None],
    autocast: Callable[[], contextlib.AbstractContextManager],
    mask: torch.Tensor | None = None,
    causal: bool = True,
    **attention_kw,
) -> torch.Tensor:
    """Gloeckle et al. 2024's memory-saving backward for parallel heads: the trunk's forward once; then for the main
    head and each MTP head in turn, its forward and `backward(term)` (the trainer's normalisation and loss scaling of
    one loss term, a sum of per-token losses) on a detached copy of the trunk's output, whose gradient accumulates;
    then one backward through the trunk. Only one head's graph (its logits) is alive at a time; the parameters'
    gradients are those of backpropagating the whole MTP loss at once. Returns the loss's sum, detached."""
    if model.mtp_kind != "parallel":
        raise ValueError("per_head_backward needs parallel heads (objective.mtp_kind parallel)")
    attention_kw.pop("mtp_ids", None)  # parallel heads embed nothing
    labels = attention_kw.pop("mtp_labels", None)
    with autocast():
        h = model.hidden_states(tokens, mask, causal, **attention_kw)
    trunk = h.detach().requires_grad_()
    heads = model.depth_heads(trunk, tokens, mask, causal, **attention_kw)
    w = model.mtp_weight / model.mtp_depth
    terms = [(1.0, lambda x: x, targets)]
    terms += [(w, head, shift_left(targets, k, IGNORE_INDEX) if labels is None else labels[:, k - 1])
              for k, head in enumerate(heads, start=1)]  # fmt: skip
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for weight, head, target in terms:
        with autocast():
            loss = weight * model.output(head(trunk), target, "sum")
        backward(loss)
        total += loss.detach().double()
    h.backward(trunk.grad)
    return total
