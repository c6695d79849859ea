"""Validation loss and perplexity of a loaded run on held-out data, computed as the trainer computes it.

The samples are the trainer's evaluation set (`engine.training.samples.eval_dataset`: `batches x
train.global_batch` fixed samples of the run's seq_len and seed, the same index cache) and the loss is
`engine.training.evaluate.evaluate` (summed per-token losses over the loss-bearing tokens, with the run's packed
document layout and objective), so on the run's own valid_path and eval.batches the result is the `val_loss` the
trainer logged at the checkpoint's step. Perplexity is exp(loss), per token of the run's tokenizer. The held-out data
may be a blend ("w1 prefix1 w2 prefix2"): the loss is then also reported per component, as the trainer logs it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from engine.config import ConfigError
from engine.data._files import cache_root
from engine.data.blended_dataset import parse_blend
from engine.evaluation.loading import LoadedRun
from engine.training.evaluate import evaluate
from engine.training.precision import autocast, resolve_dtype
from engine.training.samples import SequenceLayout, eval_dataset, load_data_sources
from engine.training.validate import batch_layout


@dataclass
class Perplexity:
    loss: float  # mean per-token loss (nats)
    perplexity: float
    tokens: int | None  # loss-bearing tokens scored (causal LM; None under another objective)
    samples: int
    data: str  # the held-out prefix, or blend "w1 prefix1 w2 prefix2 ..."
    components: dict[str, float] = field(default_factory=dict)  # a blend's loss per component (prefix basename)


def held_out_prefix(run: LoadedRun, data: str | None) -> str:
    """`data`, else the run's data.valid_path (the embedded corpus's valid split for an embedded run)."""
    if data:
        return data
    prefix = load_data_sources(run.cfg).valid_prefix
    if not prefix:
        raise ConfigError("the run has no data.valid_path; give held-out data with --data PREFIX")
    return prefix


def validation_perplexity(run: LoadedRun, data: str | None = None, batches: int | None = None) -> Perplexity:
    """Loss and perplexity over `batches` (default: the run's eval.batches) global batches of held-out samples."""
    cfg = run.cfg
    batches = cfg.eval.batches if batches is None else batches
    if batches < 1:
        raise ConfigError(f"--batches must be >= 1, got {batches}")
    prefix = held_out_prefix(run, data)
    for _, path in parse_blend(prefix, check_exists=False):  # a prefix or a blend, as data.valid_path takes
        if not (os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx")):
            raise FileNotFoundError(f"held-out data {path}.bin/.idx not found")
    m, gb = cfg.model, cfg.train.global_batch
    index_cache = os.path.join(cache_root(cfg.data.cache_dir or None), "indices")
    ds = eval_dataset(prefix, batches * gb, m.seq_len, cfg.train.seed, m.vocab_size, index_cache)
    micro, _ = batch_layout(gb, cfg.train.micro_batch, 1)
    # one process holds whole sequences, whatever layout the run trained in (no context-parallel cut)
    layout = SequenceLayout.from_config(replace(cfg, parallel=replace(cfg.parallel, cp=1)), run.tokenizer, 0)
    dtype = resolve_dtype(cfg, run.device)
    loss = evaluate(run.model, ds, batches, gb, micro, 0, 1, run.device, lambda: autocast(dtype, run.device),
                    None, layout)  # fmt: skip
    tokens = batches * gb * m.seq_len if layout.objective is None else None
    components = dict(getattr(loss, "components", {}))  # engine.training.evaluate's ValidationLoss, for a blend
    return Perplexity(float(loss), math.exp(min(loss, 50.0)), tokens, batches * gb, prefix, components)
