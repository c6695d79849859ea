"""Run directories the trainer resumes, written from a Hugging Face model, and checkpoints of any layout read back.

`write_run_dir` lays out what `python -m engine.train` itself leaves after step 0: `RUN_DIR/config.toml` (the
resolved config, the model section from the Hugging Face config) and `RUN_DIR/checkpoints/step_00000000` written
by the trainer's own `save_training_state` (one process's layout, a fresh AdamW's groups with no moments yet, the RNG
state a fresh run seeds), so `python -m engine.train --config RUN_DIR/config.toml` resumes it at step 0, in any
parallel layout (a resume reshards). `RUN_DIR/hf/` keeps the source's config.json and tokenizer files, for
`to-hf` to give them back (token ids, the vocabulary before padding).

`read_checkpoint` assembles the model's global tensors from a checkpoint whatever layout saved it (tp slices,
pipeline stages, FSDP2 shards), region by region through `CheckpointReader`, as `python -m engine.checkpoint
consolidate` does, with the run's model config from the checkpoint's config.toml.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.checkpoint.checkpointer import (
    CheckpointError,
    complete_checkpoints,
    resolve_checkpoint_path,
    verify_checkpoint,
)
from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.training_state import save_training_state
from engine.config import Config, ModelConfig, load_config, load_toml
from engine.convert.hf_config import ConvertError
from engine.model.gpt import resolve
from engine.optim.build import build_optimizer
from engine.parallel.sharding import sharding_of
from engine.training.resume import resolved_config

HF_SUBDIR = "hf"
# The layout of one process, as the trainer records it (engine.train: ParallelDims.as_dict + sp + virtual_stages).
ONE_PROCESS = {"world_size": 1, "dp": 1, "tp": 1, "pp": 1, "cp": 1, "dp_shard": 1, "sp": False, "virtual_stages": 1}


def write_run_dir(model: nn.Module, cfg: Config, run_dir: str | Path) -> Path:
    """Writes `model` (a plain GPT built from cfg.model) as step 0 of a run directory with config `cfg`; refuses a
    directory that already holds checkpoints. Returns the checkpoint's path."""
    run_dir = Path(run_dir)
    if complete_checkpoints(run_dir / "checkpoints"):
        raise ConvertError(f"{run_dir} already holds checkpoints; convert into a new run directory")
    cfg.run.dir = str(run_dir)
    rcfg = resolved_config(cfg, resolve(cfg.model))
    optimizer = build_optimizer(model, cfg.optim)  # the trainer's parameter groups; moments start at the first step
    meta = {"consumed_samples": 0, "layout": ONE_PROCESS, "config": rcfg.to_dict(),
            "scheduler": {"step": 0, "decay_steps": rcfg.optim.decay_steps}}  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(rcfg.to_toml())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 1)  # what a fresh one-process run seeds its default generator with
        return save_training_state(
            run_dir / "checkpoints", 0, chunks=[model], optimizer=optimizer, sharding=sharding_of(model), scaler=None,
            rng_trackers=[None], device=torch.device("cpu"), meta=meta, toml=rcfg.to_toml(), keep=0, tp_rank=0,
            dp_rank=0,
        )  # fmt: skip


def read_checkpoint(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], Config, Path]:
    """(the model's global tensors by name, the run's config, the checkpoint directory) of a run directory, its
    `checkpoints` folder or one step directory, whatever layout saved it; checksums of the files read verified."""
    ckpt = resolve_checkpoint_path(path)
    if not (ckpt / "config.toml").is_file():
        raise ConvertError(f"checkpoint {ckpt} has no config.toml (saved by engine.checkpoint.save?): its model "
                           "config is unknown")  # fmt: skip
    cfg = load_config(["--config", str(ckpt / "config.toml")])
    reader = CheckpointReader(ckpt)
    try:
        names = reader.names("model")
        if not names:
            raise CheckpointError(f"checkpoint {ckpt} holds no model tensors")
        if verify:
            shards = reader.manifest["tensors"]
            verify_checkpoint(ckpt, files=sorted({s["file"] for n in names for s in shards[n]["shards"]}))
        state = {n: reader.read(n) for n in names}  # each assembled from its shards, whatever the layout
    finally:
        reader.close()
    cfg.model = resolve(cfg.model)
    return state, cfg, ckpt


def hf_source(ckpt: Path) -> Path | None:
    """The `hf/` folder `write_run_dir`'s caller left in the run directory of checkpoint `ckpt`, if any."""
    for d in (ckpt.parent.parent, ckpt.parent):  # RUN_DIR/checkpoints/step_X, or a bare checkpoints root
        if (d / HF_SUBDIR / "config.json").is_file():
            return d / HF_SUBDIR
    return None


def user_keys(argv: list[str]) -> set[str]:
    """The dotted config keys a user set, by `--section.key` flags or in the tables of a `--config` file."""
    keys, config_files = set(), []
    for i, arg in enumerate(argv):
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name == "config":
            config_files.append(value if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
        elif "." in name:
            keys.add(name)
    for f in config_files:
        keys |= {f"{t}.{k}" for t, table in load_toml(f).items() if isinstance(table, dict) for k in table}
    return keys


def merge_model(hf_cfg: ModelConfig, user: ModelConfig, overridden: set[str], source: str) -> ModelConfig:
    """The model section of a converted run: the Hugging Face shape, with the user's choices of what does not
    change the weights (kernels, recomputation, dropout; the sequence length of a rotary model)."""
    free = {"kernels", "recompute", "dropout"} | ({"seq_len"} if hf_cfg.arch == "llama" else set())
    fixed = sorted(overridden - free)
    if fixed:
        raise ConvertError(f"model.{fixed[0]} comes from {source}; only model.{', model.'.join(sorted(free))} "
                           "may be set when converting")  # fmt: skip
    out = ModelConfig(**vars(hf_cfg))
    for key in overridden:
        setattr(out, key, getattr(user, key))
    return out
