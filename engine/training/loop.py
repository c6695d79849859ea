"""The training loop over a set-up run (`engine.train._Run`): steps, metrics, evaluation, checkpoints and the guards.

Per step: the watchdog times `train_step`; a step whose gradient norm is non-finite is handled per
`resilience.on_nan` (skip its update, the default; roll back to the last checkpoint and skip its batch; or stop);
spikes, stragglers and GPU health go into the step's metrics; evaluation and checkpoints run as watchdog phases; a
SIGTERM on any rank makes every rank save the current step and leave the loop. A checkpoint's stall (what the loop
waited for: the whole write, or with checkpoint.async the staging in host memory) is logged with the save and
recorded in the next step's metrics (`checkpoint_stall_s`); an async save's write time is logged when it lands.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from engine.metrics import MetricsLogger, memory_gb, model_flops_utilization, peak_flops
from engine.training.evaluate import component_metrics
from engine.training.validate import TrainError


@dataclass
class TrainResult:
    """What a run did, for callers that embed the loop (tests, benchmarks)."""

    start_step: int
    end_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss (step 0: before training)
    grad_norms: dict[int, float] = field(default_factory=dict)  # step -> global gradient norm before clipping
    skipped_steps: list[int] = field(default_factory=list)  # steps whose update was skipped (non-finite gradients)
    rollbacks: list[int] = field(default_factory=list)  # steps that rolled back to the last checkpoint (on_nan)
    preempted: bool = False  # stopped early by SIGTERM, after saving its step
    checkpoint_stall_s: list[float] = field(default_factory=list)  # what each save held the loop up
    tokens_per_s: float = 0.0  # mean over the steps after the first (which carries warm-up costs)
    wall_s: float = 0.0  # setup + training + checkpoints
    run_dir: str = ""


def _header(run: Any) -> str:
    from engine.model.gpt import count_params

    cfg, rcfg = run.cfg, run.rcfg
    n, n_body = count_params(rcfg.model), count_params(rcfg.model, non_embedding=True)  # the whole model's
    tp = f", tp {run.tp}{' + sp' if run.sp else ''}" if run.tp > 1 else ""
    tp += f", pp {run.dims.pp} ({cfg.parallel.pp_schedule})" if run.dims.pp_enabled else ""
    tp += f", cp {run.dims.cp} ({cfg.parallel.cp_impl})" if run.dims.cp_enabled else ""
    return (
        f"model: {rcfg.model.arch}, {n / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M non-embedding), "
        f"{run.flops_per_token / 1e6:.2f} MFLOPs/token; device {run.device.type} ({run.dtype}), dp {run.dp}{tp}, "
        f"micro batch {run.micro} x {run.accum} accumulation x {run.dp} = {cfg.train.global_batch}"
    )


def _save(run: Any, logger: MetricsLogger, result: TrainResult) -> float:
    """Checkpoints the current step (in the background with checkpoint.async), logs what it cost the loop and
    returns that stall (seconds)."""
    t0 = time.perf_counter()
    with run.guards.phase("checkpoint"):
        path, previous = run.save()
    stall = time.perf_counter() - t0
    result.checkpoint_stall_s.append(stall)
    _log_written(logger, previous)
    if path is not None:
        logger.write(f"step {run.step}: saved checkpoint {path} ({stall:.2f} s)")
    else:
        logger.write(f"step {run.step}: checkpoint staged in {stall:.3f} s, writing in the background")
    return stall


def _log_written(logger: MetricsLogger, record: Any) -> None:
    if record is not None:
        logger.write(f"checkpoint of step {record.step} written in {record.write_s:.2f} s: {record.result}")


def run_loop(run: Any) -> TrainResult:
    cfg, rcfg, total = run.cfg, run.rcfg, run.cfg.train.steps
    run.guards.lock_run_dir(required=True)  # one job per run directory, before anything is written to it
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
    run.guards.start()
    try:
        logger.write(_header(run))
        for note in run.notes:
            logger.write(note)
        if run.loaded is not None:
            logger.write(f"resumed from {run.loaded.path} at step {run.step}")
            run.loaded = None
        peak, tokens_per_step = peak_flops(run.device), cfg.train.global_batch * rcfg.model.seq_len
        if run.step == 0 and run.valid_ds is not None and total > 0:
            with run.guards.phase("evaluation"):
                val = result.val_losses[0] = run.evaluate()
            logger.write(f"step 0: val_loss {val:.4f}")
            logger.log({"step": 0, "loss": None, "lr": None, "grad_norm": None, "tokens": 0, "tokens_per_s": None,
                        "mfu": None, "mem_gb": memory_gb(run.device), "val_loss": val,
                        "val_ppl": math.exp(min(val, 50.0)), **component_metrics(val)})  # fmt: skip
        timed_tokens, timed_s, first, consecutive_skips, stall = 0, 0.0, run.step + 1, 0, None
        while run.step < total:
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            t0 = time.perf_counter()
            with run.guards.step(run.step + 1):
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
            if stall is not None:  # the previous step's save (logged after its record, so a crash in the save
                rec["checkpoint_stall_s"], stall = stall, None  # never loses a step's record)
            result.losses[step], result.grad_norms[step] = out.loss, out.grad_norm
            # fp16's routine scale back-offs do not count; a scale driven below 1 does
            consecutive_skips = consecutive_skips + 1 if out.skipped and not out.scale_backoff else 0
            if out.skipped and not out.scale_backoff and cfg.resilience.on_nan != "skip":
                logger.log(rec)
                if cfg.resilience.on_nan == "stop":
                    raise TrainError(
                        f"step {step} had a non-finite gradient norm ({out.grad_norm}) and resilience.on_nan is "
                        "stop; the last checkpoint is kept: lower optim.lr, check the data, or use fp32"
                    )
                path = run.rollback(step)
                result.rollbacks.append(step)
                logger.rewind(run.step)
                logger.write(
                    f"step {step}: gradient norm {out.grad_norm}: rolled back to {path} (step {run.step}); the "
                    f"batch of step {step} will be skipped ({len(result.rollbacks)} rollback(s) so far)"
                )
                consecutive_skips = 0
                continue
            if out.skipped:
                result.skipped_steps.append(step)
                rec["skipped_total"] = len(result.skipped_steps)
                logger.write(f"step {step}: gradient norm {out.grad_norm}, update skipped")
            rec["rollbacks"] = len(result.rollbacks)
            for line in run.guards.after_step(step, out.loss, dt, rec):
                logger.write(line)
            if run.valid_ds is not None and (step % cfg.eval.every == 0 or step == total):
                with run.guards.phase("evaluation"):
                    val = result.val_losses[step] = rec["val_loss"] = run.evaluate()
                rec["val_ppl"] = math.exp(min(val, 50.0))
                rec.update(component_metrics(val))  # val_loss/<component> for a blend
            if consecutive_skips >= cfg.train.max_skipped_steps:
                logger.log(rec)
                raise TrainError(
                    f"{consecutive_skips} consecutive steps (up to step {step}) had a non-finite gradient norm and "
                    f"were skipped (train.max_skipped_steps); the last checkpoint is kept: lower optim.lr, check the "
                    "data, or use fp32"
                )
            logger.log(rec)
            stop = run.guards.should_stop()  # SIGTERM on any rank: every rank saves this step and leaves
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == total or stop:
                stall = _save(run, logger, result)
            if stop:
                result.preempted = True
                logger.write(f"step {step}: stopping on SIGTERM (pre-emption) after saving this step")
                break
        _log_written(logger, run.wait_saves())
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
