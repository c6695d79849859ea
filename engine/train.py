"""The training entry point: `python -m engine.train [--config F] [--section.key value ...]`, launched by torchrun.

Build order (docs/architecture.md): config and resume target -> process groups (`ParallelDims`) -> data -> the
plain model on the meta device -> `parallelize_gpt` (pipeline stages, tensor/sequence parallelism, recomputation,
materialisation, per-parameter seeded init, data parallelism) -> optimizer -> restore a checkpoint -> the loop. The
pieces live in `engine.training`: the step (or the pipeline step), precision, resume, samples, the dry run.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.config import Config, ConfigError, load_config
from engine.metrics import MetricsLogger, memory_gb, model_flops_utilization, peak_flops
from engine.optim.schedules import lr_at, set_lr
from engine.training.samples import SampleStream, collate, eval_dataset, load_data_sources, micro_batches
from engine.training.validate import TrainError, batch_layout, check_config, one_line

__all__ = ["SampleStream", "TrainError", "TrainResult", "main", "train"]


@dataclass
class TrainResult:
    """What a run did, for callers that embed the loop (tests, benchmarks)."""

    start_step: int
    end_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss (step 0: before training)
    grad_norms: dict[int, float] = field(default_factory=dict)  # step -> global gradient norm before clipping
    skipped_steps: list[int] = field(default_factory=list)  # steps whose update was skipped (non-finite gradients)
    tokens_per_s: float = 0.0  # mean over the steps after the first (which carries warm-up costs)
    wall_s: float = 0.0  # setup + training + checkpoints
    run_dir: str = ""


class _Run:
    """Everything one training run holds; `setup` builds it (writing nothing) in the documented order."""

    def __init__(self, cfg: Config) -> None:
        from engine.model.ops import select
        from engine.training.device import cpu_threads, resolve_device
        from engine.training.precision import resolve_dtype

        self.t_start, self.dims = time.perf_counter(), None
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
        from engine.data._files import cache_root
        from engine.model.gpt import GPT, flops_per_token, resolve
        from engine.optim.distributed import build_training_optimizer
        from engine.parallel.dims import ParallelDims
        from engine.parallel.parallelize import check_tensor_parallel, parallelize_gpt
        from engine.parallel.rng import rng_tracker_of
        from engine.parallel.sharding import ShardingRegistry, sharding_of
        from engine.parallel.state import init_process_group
        from engine.training import precision, resume
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
            init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.dims = dims = ParallelDims.from_world(tp=p.tp, pp=p.pp, cp=p.cp, dp_shard=p.dp_shard)
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
        seq, seed, vocab = model_cfg.seq_len, cfg.train.seed, model_cfg.vocab_size
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
            model = GPT(model_cfg)
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
            self.step, self.consumed = resume.restore_training_state(
                self.loaded, chunks=self.chunks, optimizer=self.optimizer, sharding=self.sharding, scaler=self.scaler,
                rng_trackers=self.trackers, device=self.device, layout=self.layout, rank=self.rank,
            )  # fmt: skip

    def train_step(self):
        """One optimizer step at self.step + 1 (engine.training.step.StepResult)."""
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

    def save(self) -> Path:
        from engine.training.resume import save_training_state

        meta = {"consumed_samples": self.consumed, "layout": self.layout, "config": self.rcfg.to_dict(),
                "scheduler": {"step": self.step, "decay_steps": self.rcfg.optim.decay_steps}}  # fmt: skip
        return save_training_state(
            self.ckpt_root, self.step, chunks=self.chunks, optimizer=self.optimizer, sharding=self.sharding,
            scaler=self.scaler, rng_trackers=self.trackers, device=self.device, meta=meta, toml=self.rcfg.to_toml(),
            keep=self.cfg.checkpoint.keep, tp_rank=self.tp_rank, dp_rank=self.dims.rank_in("dp_cp"),
        )  # fmt: skip

    def close(self) -> None:
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
        return _loop(run)
    finally:
        run.close()


def _loop(run: _Run) -> TrainResult:
    cfg, rcfg, total = run.cfg, run.rcfg, run.cfg.train.steps
    if run.rank == 0:  # only now, with every check passed, is the run directory written
        run.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run.run_dir / ".config.toml.tmp"
        tmp.write_text(rcfg.to_toml())
        os.replace(tmp, run.run_dir / "config.toml")
    if run.distributed:
        dist.barrier()
    logger = MetricsLogger(run.run_dir, start_step=run.step, total_steps=total, enabled=run.rank == 0,
                           tensorboard=cfg.run.tensorboard, progress=cfg.run.progress, log_every=cfg.run.log_every)
    result = TrainResult(start_step=run.step, end_step=run.step, run_dir=str(run.run_dir))
    try:
        from engine.model.gpt import count_params

        n, n_body = count_params(rcfg.model), count_params(rcfg.model, non_embedding=True)  # the whole model's
        tp = f", tp {run.tp}{' + sp' if run.sp else ''}" if run.tp > 1 else ""
        tp += f", pp {run.dims.pp} ({cfg.parallel.pp_schedule})" if run.dims.pp_enabled else ""
        tp += f", cp {run.dims.cp} ({cfg.parallel.cp_impl})" if run.dims.cp_enabled else ""
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
        peak, tokens_per_step = peak_flops(run.device), cfg.train.global_batch * rcfg.model.seq_len
        if run.step == 0 and run.valid_ds is not None and total > 0:
            val = result.val_losses[0] = run.evaluate()
            logger.write(f"step 0: val_loss {val:.4f}")
            logger.log({"step": 0, "loss": None, "lr": None, "grad_norm": None, "tokens": 0, "tokens_per_s": None,
                        "mfu": None, "mem_gb": memory_gb(run.device), "val_loss": val,
                        "val_ppl": math.exp(min(val, 50.0))})  # fmt: skip
        timed_tokens, timed_s, first, consecutive_skips = 0, 0.0, run.step + 1, 0
        while run.step < total:
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            t0 = time.perf_counter()
            out, lr = run.train_step()  # .item() inside synchronises
            dt, step = time.perf_counter() - t0, run.step
            if step > first:
                timed_tokens, timed_s = timed_tokens + tokens_per_step, timed_s + dt
            tps = tokens_per_step / dt
            rec = {"step": step, "loss": out.loss, "lr": lr, "grad_norm": out.grad_norm,
                   "tokens": run.consumed * rcfg.model.seq_len, "tokens_per_s": tps,
                   "mfu": model_flops_utilization(tps, run.flops_per_token, peak, run.world),
                   "mem_gb": memory_gb(run.device), "step_time_s": dt, "consumed_samples": run.consumed,
                   "loss_tokens": out.tokens, "skipped": out.skipped}  # fmt: skip
            rec.update({"loss_scale": run.scaler.get_scale()} if run.scaler is not None else {})
            result.losses[step], result.grad_norms[step] = out.loss, out.grad_norm
            # fp16's routine scale back-offs do not count; a scale driven below 1 does
            consecutive_skips = consecutive_skips + 1 if out.skipped and not out.scale_backoff else 0
            if out.skipped:
                result.skipped_steps.append(step)
                rec["skipped_total"] = len(result.skipped_steps)
                logger.write(f"step {step}: gradient norm {out.grad_norm}, update skipped")
            if run.valid_ds is not None and (step % cfg.eval.every == 0 or step == total):
                val = result.val_losses[step] = rec["val_loss"] = run.evaluate()
                rec["val_ppl"] = math.exp(min(val, 50.0))
            logger.log(rec)
            if consecutive_skips >= cfg.train.max_skipped_steps:
                raise TrainError(
                    f"{consecutive_skips} consecutive steps (up to step {step}) had a non-finite gradient norm and "
                    f"were skipped (train.max_skipped_steps); the last checkpoint is kept: lower optim.lr, check the "
                    "data, or use fp32"
                )
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == total:
                logger.write(f"step {step}: saved checkpoint {run.save()}")
        result.end_step = run.step
        result.tokens_per_s = timed_tokens / timed_s if timed_s > 0 else 0.0
        result.wall_s = time.perf_counter() - run.t_start
        if result.val_losses:
            a, b = min(result.val_losses), max(result.val_losses)
            logger.write(f"done: step {run.step}, val_loss {result.val_losses[a]:.4f} (step {a}) -> "
                         f"{result.val_losses[b]:.4f} (step {b}), {result.wall_s:.1f} s")  # fmt: skip
        else:
            logger.write(f"done: step {run.step}, {result.wall_s:.1f} s")
    finally:
        logger.close()
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI entry: returns the exit status; user errors print one line on stderr (ENGINE_DEBUG=1: a traceback)."""
    from engine.checkpoint.checkpointer import CheckpointError  # bad input, as ConfigError and TrainError

    try:
        cfg = load_config(argv)
        from engine.training.dry_run import dry_run

        dry_run(cfg) if cfg.train.dry_run else train(cfg)
    except (ConfigError, TrainError, CheckpointError) as e:
        if os.environ.get("ENGINE_DEBUG", "") not in ("", "0"):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
