"""Checks of a run's config that need nothing but the config, and the batch arithmetic."""

from __future__ import annotations

from engine.config import Config, ConfigError


class TrainError(ValueError):
    """A training setup the loop refuses (impossible batch, unsupported layout); the message is one line."""


def check_config(cfg: Config) -> None:
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
        if cfg.train.fp8 == "block" and cfg.parallel.tp > 1:  # a tile may straddle two ranks' shards
            raise TrainError("train.fp8 block with parallel.tp > 1 is not supported yet; use delayed or current")
        if cfg.parallel.pp > 1 and cfg.parallel.pp_schedule == "zb":
            raise TrainError("train.fp8 with the zb schedule is not supported yet (fp8 weight grads are not deferred)")
        if cfg.model.recompute == "full":  # a recomputed forward would record its amaxes twice
            raise TrainError("train.fp8 with model.recompute full is not supported yet; use selective or none")
        if cfg.train.fp8_amax_history < 1 or cfg.train.fp8_margin < 0:
            raise ConfigError("train.fp8_amax_history must be >= 1 and train.fp8_margin >= 0")
    p = cfg.parallel
    for key in ("tp", "pp", "virtual_stages"):
        value = getattr(p, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallel.{key} must be a positive integer, got {value!r}")
    if isinstance(p.cp, bool) or not isinstance(p.cp, int) or p.cp < 1:
        raise ConfigError(f"parallel.cp must be a positive integer, got {p.cp!r}")
    if p.cp > 1 and p.tp > 0 and cfg.model.n_heads % p.tp == 0:
        from engine.parallel.context import check_context_parallel

        try:
            check_context_parallel(cfg.model.seq_len, p.cp, p.cp_impl, cfg.model.n_heads // p.tp)
        except ValueError as e:
            raise TrainError(str(e)) from None
    if cfg.train.objective in ("span", "ul2") or cfg.model.arch == "t5":
        from engine.model.encoder_decoder import check_encoder_decoder

        check_encoder_decoder(cfg)
    if p.cp > 1 and cfg.model.window:
        raise TrainError("model.window (sliding-window attention) with parallel.cp > 1 is not supported yet")
    if p.cp > 1 and cfg.model.dropout > 0:
        raise TrainError("parallel.cp > 1 computes attention without dropout: set model.dropout 0")
    if isinstance(p.dp_shard, bool) or not isinstance(p.dp_shard, int) or p.dp_shard < 1:
        raise ConfigError(f"parallel.dp_shard must be a positive integer, got {p.dp_shard!r}")
    if p.dp_shard > 1 and p.pp > 1 and p.pp_schedule == "zb":
        raise TrainError("parallel.dp_shard (FSDP2) with the zb schedule is not supported yet; use 1f1b or interleaved")
    r = cfg.resilience
    for key in ("hang_timeout", "spike_factor", "first_step_timeout", "pg_timeout"):
        if not getattr(r, key) >= 0:
            raise ConfigError(f"resilience.{key} must be >= 0, got {getattr(r, key)}")
    if r.pg_timeout == 0 or r.first_step_timeout == 0:
        raise ConfigError("resilience.pg_timeout and resilience.first_step_timeout must be > 0")
    for key in ("spike_window", "straggler_every", "health_every"):
        if getattr(r, key) < 0:
            raise ConfigError(f"resilience.{key} must be >= 0, got {getattr(r, key)}")
    if r.spike_factor > 0 and r.spike_window < 4:
        raise ConfigError(f"resilience.spike_window must be >= 4 (quartiles of the last losses), got {r.spike_window}")
    if not r.straggler_threshold > 1 or not r.hang_factor > 0:
        raise ConfigError("resilience.straggler_threshold must be > 1 and resilience.hang_factor > 0")
    if not p.bucket_mb > 0:
        raise ConfigError(f"parallel.bucket_mb must be > 0, got {p.bucket_mb}")
    if p.zero1 and p.dp_shard > 1:
        raise TrainError("parallel.zero1 and parallel.dp_shard > 1 both shard the optimizer state: choose one")
    if cfg.train.param_dtype == "bf16" and cfg.train.dtype == "fp16":
        raise TrainError("train.param_dtype bf16 with train.dtype fp16: choose one 16-bit format (bf16)")
    if (p.zero1 or p.dp_shard > 1) and cfg.train.dtype == "fp16":
        what = "parallel.zero1" if p.zero1 else "parallel.dp_shard"
        raise TrainError(f"{what} with train.dtype fp16 is not supported yet (no sharded loss scaler): use bf16")
    if p.zero1 and cfg.optim.name != "adamw":
        raise TrainError(
            f"parallel.zero1 shards AdamW's elementwise state; optim.name {cfg.optim.name} cannot be sharded: use "
            "optim.name adamw or parallel.zero1 false"
        )
    if p.pp == 1 and (p.pp_schedule != "1f1b" or p.virtual_stages != 1 or p.pp_layers):
        raise TrainError(
            "parallel.pp_schedule, parallel.virtual_stages and parallel.pp_layers apply to pipeline parallelism: "
            "set parallel.pp > 1, or leave them at 1f1b, 1 and empty"
        )
    if cfg.train.max_skipped_steps < 1:
        raise ConfigError(f"train.max_skipped_steps must be >= 1, got {cfg.train.max_skipped_steps}")
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


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    msg = str(e).strip()
    if isinstance(e, KeyError) and msg.startswith("'"):
        msg = msg.strip("'")
    return (msg.splitlines()[0] if msg else type(e).__name__).strip()
