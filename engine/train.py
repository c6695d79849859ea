"""The training loop: `python -m engine.train [--config F] [--section.key value ...]`, launched by torchrun.

One optimizer step consumes `train.global_batch` sequences = micro batch x gradient-accumulation steps x dp. Which
sequences it sees depends only on the global sample counter (`consumed_samples`), never on the layout, so the same
config trains on the same data with 1 or N processes, and a checkpoint's data position is that one integer.
Precision: fp32 on CPU; bf16 autocast over fp32 master weights on CUDA; fp16 autocast with dynamic loss scaling.
Data parallelism is torch's DistributedDataParallel for now (no_sync on all but the last micro step), over the dp
group of the grid. Tensor parallelism (`parallel.tp`, optionally `parallel.sp`) uses the model's Megatron layers:
the tp ranks of one dp rank see the same batch; after backward the partial tp gradients are summed
(`finish_tp_grads`) and the clipping norm counts every element once over the model-parallel group. World = tp x dp.

Resume exactness (DESIGN.md, contract 3): the LR is a pure function of the step, the data position is
consumed_samples, and model, optimizer, loss-scaler and RNG states are restored exactly, so N straight steps and
k steps + resume to N give bit-identical fp32 losses on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.config import Config, ConfigError, load_config
from engine.metrics import MetricsLogger, memory_gb, model_flops_utilization, peak_flops
from engine.optim.clip import clip_grad_norm
from engine.optim.schedules import lr_at, set_lr
from engine.parallel.grads import finish_tp_grads, norm_parameters

# Config keys a resume must not change (DESIGN.md: a different model shape, optimizer, schedule or data refuses to
# resume unless forced). Everything else (steps, logging, eval, checkpointing, layout, micro batch, precision,
# kernel backend, recomputation) may change. optim.decay_steps is compared resolved; 0 (follow train.steps) keeps the
# checkpoint's on a resume.
_RESUME_LOCKED = {
    "model": None,  # every key but the ones below
    "optim": None,
    "data": ("path", "valid_path", "tokenizer", "bpe_vocab"),
    "train": ("global_batch", "seed"),
}
_RESUME_FREE_KEYS = ("model.kernels", "model.recompute", "optim.impl")  # implementation choices, same math


class TrainError(ValueError):
    """A training setup the loop refuses (impossible batch, unsupported layout); the message is one line."""


# ----------------------------------------------------------------------------------------------------------------
# Setup pieces


def _resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no CUDA device is available; use --train.device auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _cpu_threads(cfg: Config) -> int:
    """Intra-op threads for CPU training: train.threads, else OMP_NUM_THREADS, else half the cores per process.

    Half, because CPU training here mostly runs on small shared machines: on the 2-core box, with other jobs
    running, a tiny-model step took a median 0.38 s with 2 threads and 0.61 s with 1, but a mean of 1.11 s vs
    0.61 s: a descheduled thread stalls every parallel op, and those stalls dominate the run time. On an idle machine
    `--train.threads` can claim every core. torchrun sets OMP_NUM_THREADS=1 for more than one process per node.
    """
    if cfg.train.threads > 0:
        return cfg.train.threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, (os.cpu_count() or 1) // local // 2)


def _resolve_dtype(cfg: Config, device: torch.device) -> str:
    if cfg.train.dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if cfg.train.dtype == "fp16" and device.type != "cuda":
        raise ConfigError("train.dtype fp16 (loss scaling) needs CUDA; use fp32 or bf16 on CPU")
    return cfg.train.dtype


def _check_basic(cfg: Config) -> None:
    """Range checks that need nothing but the config (so they fail before any process group or data work)."""
    checks = (
        ("train.steps", cfg.train.steps, 1),
        ("train.global_batch", cfg.train.global_batch, 1),
        ("train.micro_batch", cfg.train.micro_batch, 0),
        ("train.threads", cfg.train.threads, 0),
        ("eval.every", cfg.eval.every, 0),
        ("eval.batches", cfg.eval.batches, 1),
        ("checkpoint.every", cfg.checkpoint.every, 0),
        ("checkpoint.keep", cfg.checkpoint.keep, 0),
        ("run.log_every", cfg.run.log_every, 1),
        ("optim.warmup", cfg.optim.warmup, 0),
        ("optim.decay_steps", cfg.optim.decay_steps, 0),
    )
    for key, value, low in checks:
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.optim.clip < 0:
        raise ConfigError(f"optim.clip must be >= 0 (0 turns clipping off), got {cfg.optim.clip}")
    if cfg.train.fp8 != "off":
        raise TrainError("train.fp8 is not supported by this training loop yet; use --train.fp8 off")
    p = cfg.parallel
    if isinstance(p.tp, bool) or not isinstance(p.tp, int) or p.tp < 1:
        raise ConfigError(f"parallel.tp must be a positive integer, got {p.tp!r}")
    for key in ("pp", "cp", "dp_shard"):
        if getattr(p, key) != 1:
            raise TrainError(f"parallel.{key}={getattr(p, key)} is not supported by this training loop yet; use 1")
    if cfg.checkpoint.async_:
        raise TrainError("checkpoint.async is not supported by this training loop yet; use --checkpoint.async false")
    if p.zero1:
        raise TrainError("parallel.zero1 is not supported by this training loop yet; set it false")
    if p.tp > 1 and cfg.optim.name == "adafactor":
        # Its factored second moments and RMS scalings are statistics of whole matrices: on tp shards they differ.
        raise TrainError("optim.name adafactor does not support parallel.tp > 1 yet; use --optim.name adamw or tp 1")
    if not cfg.run.dir:
        raise ConfigError("run.dir must not be empty")


def batch_layout(global_batch: int, micro_batch: int, dp: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) with global_batch = micro_batch x grad_accum x dp; micro_batch 0 derives it."""
    if micro_batch == 0:
        if global_batch % dp:
            raise TrainError(
                f"train.global_batch ({global_batch}) is not divisible by the {dp} data-parallel ranks; "
                f"make it a multiple of {dp}"
            )
        return global_batch // dp, 1
    if global_batch % (micro_batch * dp):
        raise TrainError(
            f"train.global_batch ({global_batch}) must be a multiple of train.micro_batch x dp = "
            f"{micro_batch} x {dp} = {micro_batch * dp}"
        )
    return micro_batch, global_batch // (micro_batch * dp)


def resolved_config(cfg: Config, model_cfg: Any) -> Config:
    """The config with its data-derived defaults filled in (vocab size, ffn width, kv heads, decay steps)."""
    out = copy.deepcopy(cfg)
    out.model = copy.deepcopy(model_cfg)
    if out.optim.decay_steps == 0:
        out.optim.decay_steps = out.train.steps
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], label: str = "checkpoint") -> list[str]:
    """The locked keys (`_RESUME_LOCKED`) whose values differ between a saved config (a checkpoint's, or `label`)
    and this run's."""
    diffs = []
    for section, keys in _RESUME_LOCKED.items():
        s, c = saved.get(section, {}), current.get(section, {})
        names = keys if keys is not None else sorted(set(s) | set(c))
        for k in names:
            if f"{section}.{k}" in _RESUME_FREE_KEYS:
                continue
            if s.get(k) != c.get(k):
                hint = ""
                if f"{section}.{k}" == "optim.decay_steps":
                    hint = f" (pass --optim.decay_steps {s.get(k)}, or 0, to keep the schedule)"
                diffs.append(f"{section}.{k}: {label} {s.get(k)!r}, now {c.get(k)!r}{hint}")
    return diffs


@dataclass
class _Data:
    tokenizer: Any
    train_prefix: str
    valid_prefix: str


def _load_data_sources(cfg: Config) -> _Data:
    """The tokenizer and the train/valid prefixes. Every rank calls this: the embedded corpus's file lock makes one
    rank prepare it while the others wait."""
    d = cfg.data
    cache_dir = d.cache_dir or None
    if d.path == "embedded":
        from engine.data.embedded import prepare_embedded

        emb = prepare_embedded(cache_dir=cache_dir, tokenizer=d.tokenizer, bpe_vocab=d.bpe_vocab)
        return _Data(emb.tokenizer, emb.train_prefix, d.valid_path or emb.valid_prefix)
    from engine.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(d.tokenizer, cache_dir=cache_dir, bpe_vocab=d.bpe_vocab)
    return _Data(tokenizer, d.path, d.valid_path)


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


def _eval_dataset(
    path: str, num_samples: int, seq_len: int, seed: int, vocab_size: int, cache_dir: str | None = None
) -> Any:
    """A fixed set of `num_samples` held-out samples (the same ones every eval, in every layout)."""
    from engine.data.gpt_dataset import GPTDataset

    return GPTDataset(path, num_samples, seq_len, seed, cache_dir, split="valid", vocab_size=vocab_size)


def _layout_text(layout: dict[str, Any]) -> str:
    keys = ("world_size", "dp", "tp", "sp", "pp", "cp", "dp_shard")
    return " ".join(f"{k}={layout[k]}" for k in keys if k in layout)


def _local_shard(full: torch.Tensor, param: torch.Tensor, what: str) -> torch.Tensor:
    """This rank's slice of a checkpoint's full tensor, shaped like the sharded `param` (vocabulary padding zero)."""
    from engine.checkpoint.checkpointer import CheckpointError
    from engine.parallel.tensor import shard_range

    if tuple(full.shape) != tuple(param.full_shape):
        raise CheckpointError(f"checkpoint tensor {what} has shape {tuple(full.shape)}, expected {param.full_shape}")
    dim, start, rows = shard_range(param)
    out = full.new_zeros(param.shape)
    out.narrow(dim, 0, rows).copy_(full.narrow(dim, start, rows))
    return out


def _optim_param_name(key: str) -> str:
    """The parameter an optimizer tensor `optim.<param>.<state>` belongs to."""
    return key[len("optim.") :].rpartition(".")[0]


def _micro_batches(consumed: int, global_batch: int, micro: int, dp_rank: int, dp: int) -> list[list[int]]:
    from engine.data.sampler import micro_batch_indices

    return micro_batch_indices(consumed, global_batch, micro, dp_rank, dp)


def _collate(ds: Any, indices: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of shape (len(indices), seq_len): labels are the inputs shifted by one token."""
    tokens = torch.from_numpy(np.stack([np.asarray(ds[k]["tokens"], dtype=np.int64) for k in indices]))
    tokens = tokens.to(device, non_blocking=True)
    return tokens[:, :-1], tokens[:, 1:]


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """What a run did, for callers that embed the loop (tests, benchmarks)."""

    start_step: int
    end_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss (step 0: before training)
    tokens_per_s: float = 0.0  # mean over the steps after the first (which carries warm-up costs)
    wall_s: float = 0.0  # setup + training + checkpoints
    run_dir: str = ""


def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    if isinstance(e, KeyError) and msg.startswith("'"):
        msg = msg.strip("'")
    return (msg.splitlines()[0] if msg else type(e).__name__).strip()


class _Run:
    """Everything one training run holds; built by `setup` (which writes nothing) and driven by `_loop`."""

    def __init__(self, cfg: Config) -> None:
        self.t_start = time.perf_counter()
        self.owns_parallel = False
        _check_basic(cfg)
        self.cfg = cfg
        self.device = _resolve_device(cfg)
        self.dtype = _resolve_dtype(cfg, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(_cpu_threads(cfg))
        from engine.model.ops import select

        select(cfg.model.kernels, torch.empty(0, device=self.device))  # a forced backend that cannot run here fails now
        self.notes: list[str] = []  # setup decisions the user should see, printed when the run starts

    # -- setup: every check before anything is written into the run directory --------------------------------
    def setup(self) -> None:
        from engine.checkpoint.checkpointer import (
            CheckpointError,
            complete_checkpoints,
            latest_checkpoint,
            load_checkpoint,
            read_manifest,
            resolve_checkpoint_path,
        )

        cfg = self.cfg
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        # The resume target is checked before any process group or data work: a wrong path fails in a second.
        resume = cfg.resume
        if resume not in ("auto", "never"):
            try:
                resume_path = resolve_checkpoint_path(resume)
            except CheckpointError as e:
                raise CheckpointError(f"--resume: {e}") from None
        elif resume == "never" and complete_checkpoints(self.ckpt_root):
            raise CheckpointError(
                f"--resume never, but {self.ckpt_root} already holds checkpoints that this run would overwrite; "
                "use another --run.dir or --resume auto"
            )
        else:
            resume_path = latest_checkpoint(self.ckpt_root) if resume == "auto" else None

        from engine.model.gpt import GPT, flops_per_token, resolve
        from engine.optim import build_optimizer
        from engine.parallel import state

        # The model's shape against tp first (any vocabulary will do): a head count tp cannot split fails in a
        # second, before process groups and data preparation.
        self.tp, self.sp = cfg.parallel.tp, cfg.parallel.sp and cfg.parallel.tp > 1
        if cfg.parallel.sp and not self.sp:
            self.notes.append("parallel.sp is ignored with parallel.tp 1 (sequence parallelism shards over tp ranks)")
        resolve(cfg.model, tokenizer_vocab=1, tp=self.tp, sequence_parallel=self.sp)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.owns_parallel = not _parallel_initialized()
        state.initialize(tp=self.tp, backend=backend)
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.distributed = self.world > 1
        self.dp, self.dp_rank = state.get_dp_world_size(), state.get_dp_rank()
        self.tp_rank = state.get_tp_rank()
        self.dp_group = state.get_dp_group()
        self.mp_group = state.get_model_parallel_group()  # ranks holding different shards: the global grad norm
        self.layout = {"world_size": self.world, "dp": self.dp, "tp": self.tp, "sp": self.sp, "pp": 1, "cp": 1}
        self.layout["dp_shard"] = 1
        self.micro, self.accum = batch_layout(cfg.train.global_batch, cfg.train.micro_batch, self.dp)

        data = _load_data_sources(cfg)
        self.tokenizer = data.tokenizer
        model_cfg = resolve(cfg.model, tokenizer_vocab=self.tokenizer.vocab_size, tp=self.tp, sequence_parallel=self.sp)
        self.rcfg = resolved_config(cfg, model_cfg)
        self.flops_per_token = flops_per_token(model_cfg)

        # Data: the training stream is indexed by the global sample counter (consumed_samples).
        gb, seq, seed, vocab = cfg.train.global_batch, model_cfg.seq_len, cfg.train.seed, model_cfg.vocab_size
        # Index arrays under the engine cache (keyed there by the data's checksum, seq_len, seed...): a later run on
        # the same data skips the shuffles and the vocabulary scan of the .bin.
        from engine.data._files import cache_root

        index_cache = os.path.join(cache_root(cfg.data.cache_dir or None), "indices")
        self.train_ds = SampleStream(data.train_prefix, seq, seed, vocab, index_cache)
        self.valid_ds = None
        if cfg.eval.every > 0:
            if not data.valid_prefix:
                raise ConfigError("eval.every > 0 needs data.valid_path (a held-out prefix); or set --eval.every 0")
            self.valid_ds = _eval_dataset(data.valid_prefix, cfg.eval.batches * gb, seq, seed, vocab, index_cache)

        # Checkpoint: verified (checksums) and compared with this config before the model is touched.
        self.loaded = None
        if resume_path is not None:
            saved = read_manifest(resume_path).get("layout", {})
            if saved.get("tp", 1) != self.tp:
                raise CheckpointError(
                    f"checkpoint {resume_path} was saved with tp={saved.get('tp', 1)} ({_layout_text(saved)}), this "
                    f"run has tp={self.tp} ({_layout_text(self.layout)}); resuming into another tp (resharding) is "
                    f"not implemented yet: run with --parallel.tp {saved.get('tp', 1)}"
                )
            self.loaded = load_checkpoint(resume_path, rank=self.rank)
            saved_cfg = self.loaded.manifest.get("config", {})
            saved_decay = saved_cfg.get("optim", {}).get("decay_steps")
            if cfg.optim.decay_steps == 0 and saved_decay and saved_decay != self.rcfg.optim.decay_steps:
                # decay_steps 0 follows train.steps; a resume may change train.steps (DESIGN.md) without changing
                # the schedule the run was started on, so the LR stays a function of the step alone.
                self.rcfg.optim.decay_steps = saved_decay
                self.notes.append(
                    f"train.steps {cfg.train.steps}: keeping the checkpoint's schedule (optim.decay_steps "
                    f"{saved_decay}; set --optim.decay_steps and --checkpoint.force_resume true to change it)"
                )
            diffs = config_differences(saved_cfg, self.rcfg.to_dict())
            if diffs and not cfg.checkpoint.force_resume:
                raise CheckpointError(
                    f"checkpoint {resume_path} was trained with a different config ({'; '.join(diffs)}); "
                    "use another --run.dir, or --checkpoint.force_resume true to resume anyway"
                )
        elif (self.run_dir / "config.toml").is_file() and not cfg.checkpoint.force_resume:
            # A run that stopped before its first checkpoint: starting over is fine with the same config; with
            # another, this run would replace its config.toml and records, so it must be asked for.
            import tomllib

            try:
                old = tomllib.loads((self.run_dir / "config.toml").read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise CheckpointError(
                    f"{self.run_dir / 'config.toml'} is unreadable ({_one_line(e)}); use another --run.dir, or "
                    "--checkpoint.force_resume true to start over in it"
                ) from None
            if cfg.optim.decay_steps == 0:  # starting over follows the new train.steps: not a schedule change
                old.setdefault("optim", {})["decay_steps"] = self.rcfg.optim.decay_steps
            diffs = config_differences(old, self.rcfg.to_dict(), label="config.toml")
            if diffs:
                raise CheckpointError(
                    f"{self.run_dir} holds a run with a different config and no checkpoint ({'; '.join(diffs)}); "
                    "use another --run.dir, or --checkpoint.force_resume true to start over in it"
                )

        # Model and optimizer: the same seed on every rank gives identical replicas (DDP also broadcasts rank 0's), and
        # tp shards cut from the same full tensors the one-process model draws.
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        tp_group = state.get_tp_group() if self.tp > 1 else None
        self.model = GPT(model_cfg, tp_group=tp_group, sequence_parallel=self.sp).to(self.device)
        self.param_names = {id(p): n for n, p in self.model.named_parameters()}
        self.params = list(self.model.parameters())  # what the optimizer steps and clipping scales
        # Under tp, the parameters this rank counts in the global gradient norm (each element once over the group).
        self.norm_params = norm_parameters(self.model) if self.tp > 1 else None
        self.optimizer = build_optimizer(self.model, cfg.optim)
        if self.model.rng_tracker is not None:
            # The model seeded its per-tp-rank stream with seed + 2718 + tp_rank: the dp replicas of a tp rank would
            # draw the same masks. Numbering the streams by model-parallel rank over dp (dp_rank * tp + tp_rank) keeps
            # dp rank 0 (and dp = 1) on the model's own seeds. model_parallel_seed also seeds the default generator,
            # which is re-seeded below.
            from engine.parallel.random import model_parallel_seed

            fresh = model_parallel_seed(cfg.train.seed, self.dp_rank * self.tp + self.tp_rank)
            self.model.rng_tracker.set_states(fresh.get_states())
        # Dropout masks differ between data-parallel ranks; contract 1 (layout invariance) assumes dropout 0. The
        # default stream must stay equal over the tp ranks of one dp rank (replicated regions draw the same masks).
        torch.manual_seed(cfg.train.seed + 1 + self.dp_rank)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == "fp16" else None
        self.step = 0
        self.consumed = 0
        if self.loaded is not None:
            self._restore(self.loaded)
        self.ddp = self.model
        if self.dp > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                process_group=self.dp_group,
            )

    def _restore(self, ck: Any) -> None:
        from engine.checkpoint.checkpointer import CheckpointError
        from engine.checkpoint.state import named_to_optimizer_state, restore_rng_state
        from engine.parallel.random import is_sharded

        model_sd, optim_sd = ck.tensors["model"], ck.tensors.get("optim", {})
        if self.tp > 1:  # the checkpoint holds full tensors: keep this rank's slices
            sharded = {n: p for n, p in self.model.named_parameters() if is_sharded(p)}
            model_sd = {k: _local_shard(v, sharded[k], k) if k in sharded else v for k, v in model_sd.items()}
            optim_sd = {k: self._local_optim(k, v, sharded) for k, v in optim_sd.items()}
        try:
            self.model.load_state_dict(model_sd, strict=True)
            named_to_optimizer_state(self.optimizer, self.param_names, optim_sd, ck.objects["optim"])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"checkpoint {ck.path} does not fit this model: {_one_line(e)}") from None
        if self.scaler is not None and ck.objects.get("scaler"):
            self.scaler.load_state_dict(ck.objects["scaler"])
        if ck.rank_objects is not None:  # same rank existed when it was saved (a new layout keeps fresh seeds)
            restore_rng_state(ck.rank_objects["rng"], self.device)
            tracker = ck.rank_objects.get("rng_tracker")
            if tracker and self.model.rng_tracker is not None:  # same tp (checked), so the same tp rank
                self.model.rng_tracker.set_states({k: tuple(v) for k, v in tracker.items()})
        self.step = int(ck.manifest["step"])
        self.consumed = int(ck.manifest["consumed_samples"])

    @staticmethod
    def _local_optim(key: str, value: torch.Tensor, sharded: dict[str, torch.Tensor]) -> torch.Tensor:
        """An optimizer tensor `optim.<param>.<state>` sliced like its parameter when that is sharded and the state
        is per element (exp_avg, ...); scalars such as `step` are replicated."""
        p = sharded.get(_optim_param_name(key))
        return _local_shard(value, p, key) if p is not None and value.dim() == p.dim() else value

    # -- one optimizer step -----------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step at self.step + 1; returns (mean loss over the global batch, lr, grad norm)."""
        cfg = self.cfg
        lr = lr_at(self.step, self.rcfg.optim, self.rcfg.optim.decay_steps)
        set_lr(self.optimizer, lr)
        batches = _micro_batches(self.consumed, cfg.train.global_batch, self.micro, self.dp_rank, self.dp)
        loss_sum = torch.zeros((), device=self.device)
        for i, idx in enumerate(batches):
            x, y = _collate(self.train_ds, idx, self.device)
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if (last or self.dp == 1) else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    loss = self.ddp(x, y)
                scaled = loss / len(batches)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        if self.tp > 1:
            finish_tp_grads(self.model)  # after the last micro batch: DDP has reduced over dp (the sum is linear)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            if self.tp > 1:
                _agree_found_inf(self.scaler, self.optimizer, self.mp_group)
        if self.tp > 1:
            grad_norm = clip_grad_norm(
                self.params, cfg.optim.clip, group=self.mp_group, norm_parameters=self.norm_params
            )
        else:
            grad_norm = clip_grad_norm(self.params, cfg.optim.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.consumed += cfg.train.global_batch
        if self.dp > 1:  # the tp ranks of a dp rank already hold the same full loss
            dist.all_reduce(loss_sum, group=self.dp_group)
        return loss_sum.item() / (len(batches) * self.dp), lr, float(grad_norm)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over eval.batches global batches of the held-out split (the same samples in any layout)."""
        self.model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        gb = self.cfg.train.global_batch
        for b in range(self.cfg.eval.batches):
            for idx in _micro_batches(b * gb, gb, self.micro, self.dp_rank, self.dp):
                x, y = _collate(self.valid_ds, idx, self.device)
                with self._autocast():
                    total += self.model(x, y).double()
                count += 1
        self.model.train()
        if self.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
            count *= self.dp
        return total.item() / count

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save(self) -> Path:
        from engine.checkpoint.checkpointer import save_checkpoint
        from engine.checkpoint.state import capture_rng_state, optimizer_state_to_named

        otensors, ometa = optimizer_state_to_named(self.optimizer, self.param_names)
        tensors = {"model": dict(self.model.state_dict()), "optim": otensors}
        shards: dict[str, tuple[list[int], list[int]]] = {}
        if self.tp > 1:
            tensors, shards = self._tp_shards(tensors)
        meta = {
            "consumed_samples": self.consumed,
            "scheduler": {"step": self.step, "decay_steps": self.rcfg.optim.decay_steps},
            "layout": self.layout,
            "config": self.rcfg.to_dict(),
        }
        objects = {"optim": ometa, "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        tracker = self.model.rng_tracker
        return save_checkpoint(
            self.ckpt_root,
            self.step,
            tensors=tensors,
            objects=objects,
            rank_objects={
                "rng": capture_rng_state(self.device),
                "rng_tracker": tracker.get_states() if tracker is not None else None,
            },
            meta=meta,
            texts={"config.toml": self.rcfg.to_toml()},
            keep=self.cfg.checkpoint.keep,
            shards=shards,
            write_tensors=self.dp_rank == 0,
        )

    def _tp_shards(
        self, tensors: dict[str, dict[str, torch.Tensor]]
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, tuple[list[int], list[int]]]]:
        """What this rank writes under tp: its slices of sharded parameters (and of their per-element optimizer
        state) without vocabulary padding, with their place in the full tensor; tp rank 0 also the replicated ones."""
        from engine.parallel.random import is_sharded
        from engine.parallel.tensor import shard_range

        sharded = {n: p for n, p in self.model.named_parameters() if is_sharded(p)}
        out: dict[str, dict[str, torch.Tensor]] = {}
        shards: dict[str, tuple[list[int], list[int]]] = {}
        for group, named in tensors.items():
            out[group] = {}
            for key, value in named.items():
                p = sharded.get(_optim_param_name(key) if group == "optim" else key)
                if p is None or value.dim() != p.dim():
                    if self.tp_rank == 0:
                        out[group][key] = value
                    continue
                dim, start, rows = shard_range(p)
                if rows == 0:  # a shard of nothing but padding
                    continue
                out[group][key] = value.narrow(dim, 0, rows)
                offsets = [0] * value.dim()
                offsets[dim] = start
                shards[key] = (list(p.full_shape), offsets)
        return out, shards

    def close(self) -> None:
        if self.owns_parallel:
            from engine.parallel.state import destroy

            destroy()


def _agree_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, group: Any) -> None:
    """fp16 under tp: an overflow in one rank's shard must skip the step (and back off the scale) on every rank of
    the model-parallel group, or the shards of one model would diverge. GradScaler keeps the flags of `unscale_`
    per optimizer; `step` and `update` read them afterwards, so a max over the group here is what both see."""
    for found in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)


def _parallel_initialized() -> bool:
    from engine.parallel.state import is_initialized

    return is_initialized()


def train(cfg: Config) -> TrainResult:
    """Runs (or resumes) training per `cfg`; every rank of the job calls it. Returns what this run did."""
    try:
        run = _Run(cfg)
    except (ConfigError, TrainError):
        raise
    try:
        try:
            run.setup()
        except (ConfigError, TrainError):
            raise
        except (ValueError, OSError) as e:  # bad input met while setting up (data, checkpoint, model shape)
            raise TrainError(_one_line(e)) from e
        return _loop(run)
    finally:
        run.close()


def _loop(run: _Run) -> TrainResult:
    cfg, rcfg = run.cfg, run.rcfg
    is_main = run.rank == 0
    if is_main:  # only now, with every check passed, is the run directory written
        run.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run.run_dir / ".config.toml.tmp"
        tmp.write_text(rcfg.to_toml())
        os.replace(tmp, run.run_dir / "config.toml")
    if run.distributed:
        dist.barrier()
    total = cfg.train.steps
    logger = MetricsLogger(
        run.run_dir,
        start_step=run.step,
        total_steps=total,
        enabled=is_main,
        tensorboard=cfg.run.tensorboard,
        progress=cfg.run.progress,
        log_every=cfg.run.log_every,
    )
    result = TrainResult(start_step=run.step, end_step=run.step, run_dir=str(run.run_dir))
    try:
        from engine.model.gpt import count_params

        # The whole model's counts (under tp the module holds only this rank's shards).
        n, n_body = count_params(rcfg.model), count_params(rcfg.model, non_embedding=True)
        tp = f", tp {run.tp}{' + sp' if run.sp else ''}" if run.tp > 1 else ""
        logger.write(
            f"model: {rcfg.model.arch}, {n / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M non-embedding), "
            f"{run.flops_per_token / 1e6:.2f} MFLOPs/token; device {run.device.type} ({run.dtype}), dp {run.dp}{tp}, "
            f"micro batch {run.micro} x {run.accum} accumulation x {run.dp} = {cfg.train.global_batch}"
        )
        for note in run.notes:
            logger.write(note)
        if run.loaded is not None:
            logger.write(f"resumed from {run.loaded.path} at step {run.step}")
            run.loaded = None  # release the loaded tensors
        peak = peak_flops(run.device)
        tokens_per_step = cfg.train.global_batch * rcfg.model.seq_len
        if run.step == 0 and run.valid_ds is not None and total > 0:
            val = run.evaluate()
            result.val_losses[0] = val
            logger.write(f"step 0: val_loss {val:.4f}")
            logger.log(
                {
                    "step": 0,
                    "loss": None,
                    "lr": None,
                    "grad_norm": None,
                    "tokens": 0,
                    "tokens_per_s": None,
                    "mfu": None,
                    "mem_gb": memory_gb(run.device),
                    "val_loss": val,
                    "val_ppl": math.exp(min(val, 50.0)),
                }
            )
        timed_tokens, timed_s = 0, 0.0
        first = run.step + 1
        while run.step < total:
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            t0 = time.perf_counter()
            loss, lr, grad_norm = run.train_step()  # .item() inside synchronises
            dt = time.perf_counter() - t0
            step = run.step
            tps = tokens_per_step / dt
            if step > first:
                timed_tokens += tokens_per_step
                timed_s += dt
            rec = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": run.consumed * rcfg.model.seq_len,
                "tokens_per_s": tps,
                "mfu": model_flops_utilization(tps, run.flops_per_token, peak, run.world),
                "mem_gb": memory_gb(run.device),
                "step_time_s": dt,
                "consumed_samples": run.consumed,
            }
            if run.scaler is not None:
                rec["loss_scale"] = run.scaler.get_scale()
            result.losses[step] = loss
            if run.valid_ds is not None and (step % cfg.eval.every == 0 or step == total):
                val = run.evaluate()
                result.val_losses[step] = val
                rec["val_loss"] = val
                rec["val_ppl"] = math.exp(min(val, 50.0))
            logger.log(rec)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == total:
                path = run.save()
                logger.write(f"step {step}: saved checkpoint {path}")
        result.end_step = run.step
        result.tokens_per_s = timed_tokens / timed_s if timed_s > 0 else 0.0
        result.wall_s = time.perf_counter() - run.t_start
        if result.val_losses:
            first_val = min(result.val_losses)
            last_val = max(result.val_losses)
            logger.write(
                f"done: step {run.step}, val_loss {result.val_losses[first_val]:.4f} (step {first_val}) -> "
                f"{result.val_losses[last_val]:.4f} (step {last_val}), {result.wall_s:.1f} s"
            )
        else:
            logger.write(f"done: step {run.step}, {result.wall_s:.1f} s")
    finally:
        logger.close()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (one-line message, no traceback) rather than a bug."""
    from engine.checkpoint.checkpointer import CheckpointError

    return (ConfigError, TrainError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: returns the exit status; user errors print one line on stderr (ENGINE_DEBUG=1: a traceback)."""
    try:
        cfg = load_config(argv)
        train(cfg)
    except _user_errors() as e:
        if os.environ.get("ENGINE_DEBUG", "") not in ("", "0"):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
