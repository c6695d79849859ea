"""The training entry point: `python -m engine.train [--config F] [--section.key value ...]`, launched by torchrun.

Build order (docs/architecture.md): config and resume target -> process groups (`ParallelDims`) -> data -> the
plain model on the meta device -> `parallelize_gpt` (pipeline stages, tensor/sequence parallelism, recomputation,
materialisation, per-parameter seeded init, data parallelism) -> optimizer -> restore a checkpoint -> the loop. The
pieces live in `engine.training`: the step (or the pipeline step), precision, resume, samples, the dry run.
"""

from __future__ import annotations

import os
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.config import Config, ConfigError, load_config
from engine.optim.schedules import lr_at, set_lr
from engine.training.loop import TrainResult, run_loop
from engine.training.samples import SampleStream, collate, eval_dataset, load_data_sources, micro_batches
from engine.training.validate import TrainError, batch_layout, check_config, one_line

__all__ = ["SampleStream", "TrainError", "TrainResult", "main", "train"]


class _Run:
    """Everything one training run holds; `setup` builds it (writing nothing) in the documented order."""

    def __init__(self, cfg: Config) -> None:
        from engine.model.ops import select
        from engine.training.device import cpu_threads, resolve_device
        from engine.training.precision import resolve_dtype

        self.t_start, self.dims, self.guards, self.saver = time.perf_counter(), None, None, None
        self.skip_samples: set[int] = set()  # data positions of batches a rollback skips
        check_config(cfg)
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.dtype = resolve_dtype(cfg, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg))
        else:  # where CUDA RNG states (the tp dropout stream) and default allocations go
            torch.cuda.set_device(self.device)
        select(cfg.model.kernels, torch.empty(0, device=self.device))  # a forced backend that cannot run here fails now
        self.notes: list[str] = []  # setup decisions the user should see, printed when the run starts

    def setup(self) -> None:
        from engine.checkpoint.async_saver import AsyncSaver
        from engine.checkpoint.training_state import restore_training_state
        from engine.data._files import cache_root
        from engine.model.gpt import flops_per_token, resolve
        from engine.model.mtp import build_gpt
        from engine.optim.distributed import build_training_optimizer
        from engine.parallel.dims import ParallelDims
        from engine.parallel.parallelize import check_tensor_parallel, parallelize_gpt
        from engine.parallel.rng import rng_tracker_of
        from engine.parallel.sharding import ShardingRegistry, sharding_of
        from engine.parallel.state import init_process_group
        from engine.training import precision, resume
        from engine.training.guards import RunGuards
        from engine.training.pipeline_step import build_step
        from engine.training.samples import SequenceLayout

        cfg, p = self.cfg, self.cfg.parallel
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        resume_path = resume.resume_target(cfg, self.ckpt_root)  # a wrong path fails in a second
        self.tp, self.sp = p.tp, p.sp and p.tp > 1
        if p.sp and not self.sp:
            self.notes.append("parallel.sp is ignored with parallel.tp 1 (sequence parallelism shards over tp ranks)")
        check_tensor_parallel(resolve(cfg.model, tokenizer_vocab=1), self.tp, self.sp)  # before groups and data
        self.owns_default_group = not dist.is_initialized()
        if self.owns_default_group:
            timeout = timedelta(seconds=cfg.resilience.pg_timeout)
            init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=timeout)
        self.dims = dims = ParallelDims.from_world(tp=p.tp, pp=p.pp, cp=p.cp, dp_shard=p.dp_shard)
        self.guards = RunGuards(cfg, self.run_dir, dims.rank, self.device)
        self.guards.lock_run_dir(required=False)  # a run directory in use by another job: refused before reading it
        self.saver = AsyncSaver() if cfg.checkpoint.async_ else None
        self.world, self.rank, self.distributed = dims.world_size, dims.rank, dims.world_size > 1
        self.dp, self.dp_rank, self.tp_rank = dims.dp, dims.rank_in("dp"), dims.rank_in("tp")
        self.layout = {**dims.as_dict(), "sp": self.sp, "virtual_stages": p.virtual_stages}
        self.micro, self.accum = batch_layout(cfg.train.global_batch, cfg.train.micro_batch, self.dp)

        data = load_data_sources(cfg)
        model_cfg = resolve(cfg.model, tokenizer_vocab=data.tokenizer.vocab_size)
        self.rcfg = resume.resolved_config(cfg, model_cfg)
        self.seq_layout = SequenceLayout.from_config(cfg, data.tokenizer, dims.rank_in("cp"))
        self.flops_per_token = flops_per_token(model_cfg)
        # Index arrays under the engine cache (keyed by the data's checksum, seq_len, seed...).
        index_cache = os.path.join(cache_root(cfg.data.cache_dir or None), "indices")
        # The samples hold seq_len + 1 tokens, or the longer window an encoder-decoder objective corrupts.
        seq, seed, vocab = self.seq_layout.stream_seq_len(model_cfg.seq_len), cfg.train.seed, model_cfg.vocab_size
        self.train_ds = SampleStream(data.train_prefix, seq, seed, vocab, index_cache)
        self.valid_ds = None
        if cfg.eval.every > 0:
            if not data.valid_prefix:
                raise ConfigError("eval.every > 0 needs data.valid_path (a held-out prefix); or set --eval.every 0")
            n_eval = cfg.eval.batches * cfg.train.global_batch
            self.valid_ds = eval_dataset(data.valid_prefix, n_eval, seq, seed, vocab, index_cache)

        # The checkpoint is verified and compared with this config before the model is touched.
        self.loaded = None
        if resume_path is not None:
            self.loaded = resume.open_checkpoint(resume_path, cfg, self.rcfg, self.layout, self.notes)
        else:
            resume.check_fresh_start(cfg, self.rcfg, self.run_dir)

        with torch.device("meta"):
            model = build_gpt(model_cfg, cfg)  # GPT, or with multi-token prediction modules (train.objective mtp)
        wrapped = parallelize_gpt(model, dims, self.rcfg, device=self.device)  # this rank's chunks
        self.chunks = [getattr(c, "module", c) for c in wrapped]  # without DDP's wrapper
        self.sharding = ShardingRegistry.merge([sharding_of(c) for c in self.chunks])
        self.trackers = [rng_tracker_of(c) for c in self.chunks]
        self.optimizer = build_training_optimizer(torch.nn.ModuleList(self.chunks), cfg.optim)
        self.scaler = precision.make_scaler(self.dtype)
        self.autocast = lambda: precision.autocast(self.dtype, self.device)
        self.step_fn = build_step(wrapped, self.optimizer, self.rcfg, dims, self.micro, self.autocast, self.scaler)
        # Host generators: the same on every rank; torch's default one differs over dp (dropout masks follow the
        # data) and stays equal over the tp ranks of a dp rank (replicated regions draw the same masks).
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed + 1 + self.dp_rank)
        self.step = self.consumed = 0
        if self.loaded is not None:
            self.step, self.consumed = restore_training_state(
                self.loaded, chunks=self.chunks, optimizer=self.optimizer, sharding=self.sharding, scaler=self.scaler,
                rng_trackers=self.trackers, device=self.device, layout=self.layout, rank=self.rank,
            )  # fmt: skip

    def train_step(self):
        """One optimizer step at self.step + 1 (engine.training.step.StepResult)."""
        while self.consumed in self.skip_samples:  # a batch that made a step non-finite before a rollback
            self.consumed += self.cfg.train.global_batch
        lr = lr_at(self.step, self.rcfg.optim, self.rcfg.optim.decay_steps)
        set_lr(self.optimizer, lr)
        idx = micro_batches(self.consumed, self.cfg.train.global_batch, self.micro, self.dp_rank, self.dp)
        result = self.step_fn([collate(self.train_ds, i, self.device, self.seq_layout) for i in idx])
        self.step += 1
        self.consumed += self.cfg.train.global_batch
        return result, lr

    def evaluate(self) -> float:
        from engine.training.evaluate import evaluate, evaluate_pipeline

        dp_group = self.step_fn.dp_group  # the ranks that share the samples: dp (x cp)
        args = (self.valid_ds, self.cfg.eval.batches, self.cfg.train.global_batch, self.micro, self.dp_rank, self.dp,
                self.device)  # fmt: skip
        if self.dims.pp_enabled:
            return evaluate_pipeline(self.step_fn.runner, *args, self.dims.group("pp"), dp_group, self.seq_layout)
        return evaluate(self.chunks[0], *args, self.autocast, dp_group, self.seq_layout)

    def save(self):
        """Checkpoints this step: (its path, None) when written now; with checkpoint.async, (None, the previous
        background save's record) once this one is staged."""
        from engine.checkpoint.training_state import save_training_state

        meta = {"consumed_samples": self.consumed, "layout": self.layout, "config": self.rcfg.to_dict(),
                "scheduler": {"step": self.step, "decay_steps": self.rcfg.optim.decay_steps}}  # fmt: skip
        previous = self.saver.wait() if self.saver is not None else None
        path = save_training_state(
            self.ckpt_root, self.step, chunks=self.chunks, optimizer=self.optimizer, sharding=self.sharding,
            scaler=self.scaler, rng_trackers=self.trackers, device=self.device, meta=meta, toml=self.rcfg.to_toml(),
            keep=self.cfg.checkpoint.keep, tp_rank=self.tp_rank, dp_rank=self.dims.rank_in("dp_cp"),
            saver=self.saver,
        )  # fmt: skip
        return path, previous

    def wait_saves(self):
        """Waits for a background save; its record (None without one)."""
        return self.saver.wait() if self.saver is not None else None

    def rollback(self, bad_step: int) -> Path:
        """Restores the last checkpoint (resilience.on_nan rollback) and marks the batch of `bad_step` to be skipped."""
        from engine.checkpoint.checkpointer import latest_checkpoint
        from engine.checkpoint.training_state import restore_training_state
        from engine.training import resume

        self.wait_saves()
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            raise TrainError(f"step {bad_step} had a non-finite gradient norm and no checkpoint to roll back to")
        self.skip_samples.add(self.consumed - self.cfg.train.global_batch)
        reader = resume.open_checkpoint(path, self.cfg, self.rcfg, self.layout, [])
        self.step, self.consumed = restore_training_state(
            reader, chunks=self.chunks, optimizer=self.optimizer, sharding=self.sharding, scaler=self.scaler,
            rng_trackers=self.trackers, device=self.device, layout=self.layout, rank=self.rank,
        )  # fmt: skip
        return reader.path

    def close(self) -> None:
        try:
            self.wait_saves()  # a background save finishes (or fails) before the groups go
        finally:
            if self.guards is not None:
                self.guards.close()
            self._destroy()

    def _destroy(self) -> None:
        if self.dims is not None:
            self.dims.destroy()
        if getattr(self, "owns_default_group", False) and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: Config) -> TrainResult:
    """Runs (or resumes) training per `cfg`; every rank of the job calls it. Returns what this run did."""
    run = _Run(cfg)
    try:
        try:
            run.setup()
        except (ConfigError, TrainError):
            raise
        except (ValueError, OSError) as e:  # bad input met while setting up (data, checkpoint, model shape)
            raise TrainError(one_line(e)) from e
        return run_loop(run)
    finally:
        run.close()


def main(argv: list[str] | None = None) -> int:
    """CLI entry: returns the exit status; user errors print one line on stderr (ENGINE_DEBUG=1: a traceback)."""
    from engine.checkpoint.checkpointer import CheckpointError  # bad input, as ConfigError and TrainError
    from engine.resilience.run_lock import RunDirLockedError

    try:
        cfg = load_config(argv)
        from engine.training.dry_run import dry_run

        dry_run(cfg) if cfg.train.dry_run else train(cfg)
    except (ConfigError, TrainError, CheckpointError, RunDirLockedError) as e:
        if os.environ.get("ENGINE_DEBUG", "") not in ("", "0"):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
