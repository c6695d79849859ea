"""The training and evaluation sample streams and how a step's micro-batches are cut from them.

Which sequences a step sees depends only on the global sample counter (`consumed_samples`), never on the layout:
step k reads samples [c, c + global_batch) and data-parallel rank r takes its contiguous slice, cut into micro-batches
(engine.data.sampler). So the same config trains on the same data with 1 or N processes, and a checkpoint's data
position is that one integer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.config import Config, ConfigError
from engine.model.head import IGNORE_INDEX
from engine.model.mtp import shift_left


@dataclass
class DataSources:
    tokenizer: Any
    train_prefix: str
    valid_prefix: str


def load_data_sources(cfg: Config) -> DataSources:
    """The tokenizer and the train/valid prefixes. Every rank calls this: the embedded corpus's file lock makes one
    rank prepare it while the others wait."""
    d = cfg.data
    cache_dir = d.cache_dir or None
    if d.path == "embedded":
        from engine.data.embedded import prepare_embedded

        emb = prepare_embedded(cache_dir=cache_dir, tokenizer=d.tokenizer, bpe_vocab=d.bpe_vocab)
        return DataSources(emb.tokenizer, emb.train_prefix, d.valid_path or emb.valid_prefix)
    from engine.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(d.tokenizer, cache_dir=cache_dir, bpe_vocab=d.bpe_vocab)
    return DataSources(tokenizer, d.path, d.valid_path)


class SampleStream:
    """The training stream: global sample k -> {"tokens": seq_len + 1 ids}, unbounded, whatever train.steps is.

    Epoch e is a one-epoch `GPTDataset` shuffled with seed + e (a blend: a `BlendedDataset` over one epoch of each
    component). Its length never depends on how long the run is, so a run extended on resume sees exactly the
    samples a straight run would (contract 3). Epochs are built lazily, when the stream first reaches them.
    `cache_dir` keeps each epoch's index arrays and the vocabulary scan for later runs (None: rebuilt every time).
    """

    def __init__(self, path: str, seq_len: int, seed: int, vocab_size: int, cache_dir: str | None = None) -> None:
        from engine.data.blended_dataset import parse_blend

        self.blend = [(w, prefix) for w, prefix in parse_blend(path) if w > 0]
        self.seq_len, self.seed, self.vocab_size, self.cache_dir = seq_len, seed, vocab_size, cache_dir
        self._epochs: dict[int, Any] = {0: self._build(0)}
        self.epoch_len = len(self._epochs[0])

    def _build(self, epoch: int) -> Any:
        from engine.data.gpt_dataset import GPTDataset

        seed = self.seed + epoch
        parts = [
            GPTDataset(prefix, None, self.seq_len, seed, self.cache_dir, vocab_size=self.vocab_size)
            for _, prefix in self.blend
        ]
        if len(parts) == 1:
            return parts[0]
        from engine.data.blended_dataset import _MARGIN, BlendedDataset

        weights = [w for w, _ in self.blend]
        total = sum(weights)
        # The longest blend that exhausts no component: component i supplies len_i samples at share w_i / total
        # (less the blend's own margin: the greedy blend strays up to about one sample from the exact proportions).
        size = int(min(len(p) * total / w for p, w in zip(parts, weights)) * (1 - _MARGIN)) - 1
        if size < 1:
            raise ConfigError(f"data.path blend {self.blend} is too small to draw one sample from every dataset")
        return BlendedDataset(parts, weights, size)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(k, self.epoch_len)
        if epoch not in self._epochs:
            self._epochs = {0: self._epochs[0], epoch: self._build(epoch)}  # keep memory bounded
        return self._epochs[epoch][i % len(self._epochs[epoch])]


def eval_dataset(
    path: str, num_samples: int, seq_len: int, seed: int, vocab_size: int, cache_dir: str | None = None
) -> Any:
    """A fixed set of `num_samples` held-out samples (the same ones every eval, in every layout). `path` may be a
    blend "w1 prefix1 w2 prefix2": its samples then come from each prefix in those proportions and the evaluation
    also reports each component's loss (engine.training.evaluate)."""
    from engine.data.blended_dataset import build_dataset

    return build_dataset(path, num_samples, seq_len, seed, cache_dir, split="valid", vocab_size=vocab_size)


def micro_batches(consumed: int, global_batch: int, micro: int, dp_rank: int, dp: int) -> list[list[int]]:
    from engine.data.sampler import micro_batch_indices

    return micro_batch_indices(consumed, global_batch, micro, dp_rank, dp)


@dataclass(frozen=True)
class SequenceLayout:
    """How a sample's sequence reaches the model on this rank: the documents packed in it (split after each EOD token,
    as Megatron's reset_attention_mask / reset_position_ids: the EOD ends its document) as segment ids for the
    attention and per-document positions, and this rank's context-parallel share (its zigzag chunks, with their
    positions in the whole sequence)."""

    eod_id: int | None = None
    document_mask: bool = False
    reset_positions: bool = False
    cp: int = 1
    cp_rank: int = 0
    objective: Any = None  # an engine.objectives SampleObjective other than clm: inputs and labels come from it
    mtp_depth: int = 0  # multi-token prediction under cp: the ids and labels each depth reads, cut as the rest

    @classmethod
    def from_config(cls, cfg: Config, tokenizer: Any, cp_rank: int) -> SequenceLayout:
        from engine.objectives.sample_objective import SampleObjective

        d, o = cfg.data, cfg.objective
        if (d.document_mask or d.reset_positions) and tokenizer.special_ids.get("eod") is None:
            raise ConfigError("data.document_mask / reset_positions split documents at EOD: the tokenizer has none")
        eod = tokenizer.eod_id if d.document_mask or d.reset_positions else None
        objective = None
        if cfg.train.objective != "clm":
            try:
                objective = SampleObjective(cfg.train.objective, cfg.train.seed, tokenizer, o.fim_rate,
                                            o.fim_spm_rate, o.mlm_mask_rate, o.prefix_min_frac, o.prefix_max_frac,
                                            cfg.model.seq_len, o.span_noise_density, o.span_mean_length,
                                            o.ul2_r_rate, o.ul2_x_rate, o.ul2_s_rate,
                                            decoder_multiple=decoder_multiple(cfg))  # fmt: skip
            except ValueError as e:
                raise ConfigError(str(e)) from None
        mtp_depth = o.mtp_depth if cfg.train.objective == "mtp" and cfg.parallel.cp > 1 else 0
        return cls(eod, d.document_mask, d.reset_positions, cfg.parallel.cp, cp_rank, objective, mtp_depth)

    def stream_seq_len(self, seq_len: int) -> int:
        """The length the sample streams are built with (each sample holds it + 1 tokens): seq_len, or one less than
        the window the objective reads (span and ul2 corrupt more raw tokens than the encoder takes)."""
        return seq_len if self.objective is None else self.objective.window_length - 1

    @property
    def plain(self) -> bool:
        return not (self.document_mask or self.reset_positions or self.cp > 1 or self.objective is not None)


def documents(inputs: torch.Tensor, eod_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment ids, positions) of the documents packed in `inputs` (b, s): a document ends at (and includes) each EOD
    token; positions count from 0 in each document."""
    eod = inputs == eod_id
    segment_ids = torch.cumsum(eod, dim=1) - eod.long()
    idx = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    starts = torch.zeros_like(idx)
    starts[:, 1:] = torch.where(eod[:, :-1], idx[:, 1:], 0)
    return segment_ids, idx - torch.cummax(starts, dim=1).values


def decoder_multiple(cfg: Config) -> int:
    """What an encoder-decoder's decoder length must be a multiple of: tp under sequence parallelism (each rank a
    shard), 2 cp under context parallelism (each rank two zigzag chunks)."""
    p = cfg.parallel
    return (p.tp if p.sp and p.tp > 1 else 1) * (2 * p.cp if p.cp > 1 else 1)


def collate(ds: Any, indices: list[int], device: torch.device, layout: SequenceLayout | None = None) -> tuple:
    """(inputs, labels) of shape (len(indices), seq_len): labels are the inputs shifted by one token, or what the
    layout's objective makes of each sample. With a `layout` that is not plain, (inputs, labels, model keyword
    arguments): `positions` and/or `segment_ids` and the objective's (mlm: `causal=False`; prefix: `prefix_lengths`
    (b,); span, ul2: `decoder_inputs` (b, t), with labels (b, t) and inputs the encoder's), every sequence cut to
    this rank's context-parallel chunks (with their `positions`; t5's decoder with `decoder_positions`; mtp's depths'
    shifted `mtp_ids` and `mtp_labels`, (b, D, s), shifted before the cut)."""
    from engine.parallel.context import shard_sequence

    if layout is not None and layout.objective is not None:  # inputs and labels per sample, from the objective
        pairs = [layout.objective(ds[k]["tokens"], k) for k in indices]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])).to(device, non_blocking=True)
        y = torch.from_numpy(np.stack([p[1] for p in pairs])).to(device, non_blocking=True)
    else:
        tokens = torch.from_numpy(np.stack([np.asarray(ds[k]["tokens"], dtype=np.int64) for k in indices]))
        tokens = tokens.to(device, non_blocking=True)
        x, y = tokens[:, :-1], tokens[:, 1:]
    if layout is None or layout.plain:
        return x, y
    extra = {}
    if layout.objective is not None:  # the objective's keywords: fixed ones, then per-row tensors (prefix lengths)
        extra = dict(layout.objective.model_kwargs)
        rows = layout.objective.batch_kwargs(indices, x.shape[1])
        if len(pairs[0]) > 2:  # per-sample keywords from the transform itself (span, ul2: `decoder_inputs`)
            rows |= {key: np.stack([p[2][key] for p in pairs]) for key in pairs[0][2]}
        for key, value in rows.items():
            extra[key] = torch.from_numpy(value).to(device, non_blocking=True)
    if layout.document_mask or layout.reset_positions:
        segment_ids, positions = documents(x, layout.eod_id)
        if layout.document_mask:
            extra["segment_ids"] = segment_ids
        if layout.reset_positions:
            extra["positions"] = positions
    if layout.cp > 1:
        extra.setdefault("positions", torch.arange(x.shape[1], device=device).expand_as(x))
        if "decoder_inputs" in extra:  # an encoder-decoder's second sequence, cut into chunks too
            t = extra["decoder_inputs"]
            extra["decoder_positions"] = torch.arange(t.shape[1], device=device).expand_as(t)
    if layout.mtp_depth:  # depth k reads the ids and labels k positions on, which may lie in another rank's chunk
        depths = range(1, layout.mtp_depth + 1)  # (b, D, s), batch first as every per-row keyword
        extra["mtp_ids"] = torch.stack([shift_left(x, k, 0) for k in depths], dim=1)
        extra["mtp_labels"] = torch.stack([shift_left(y, k, IGNORE_INDEX) for k in depths], dim=1)

    def cut(t):  # (b, s) tensors (an encoder-decoder's (b, t) ones too), and (b, D, s) ones, to this rank's chunks
        if not torch.is_tensor(t) or t.dim() < 2:
            return t
        return shard_sequence(t, layout.cp, layout.cp_rank, dim=t.dim() - 1)

    return cut(x), cut(y), {k: cut(v) for k, v in extra.items()}


def model_inputs(batch: tuple) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(inputs, labels, keyword arguments of the model) of a collated micro-batch."""
    return batch[0], batch[1], batch[2] if len(batch) > 2 else {}
