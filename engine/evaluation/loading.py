"""A run directory's newest complete checkpoint as one plain model, with the run's config and tokenizer.

The tensors are assembled from their shards by `engine.convert.run_dir.read_checkpoint` (the checkpoint reader
`python -m engine.checkpoint consolidate` and `engine.convert to-hf` use), so a run saved under tensor, pipeline or
FSDP2 parallelism evaluates on one process like a single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint.checkpointer import CheckpointError, read_manifest
from engine.config import Config
from engine.convert.api import model_from_state
from engine.convert.run_dir import read_checkpoint
from engine.model.gpt import GPT
from engine.training.samples import load_data_sources


@dataclass
class LoadedRun:
    """What evaluation needs of a run: the model (eval mode, on `device`), its tokenizer and config, and which
    checkpoint they came from."""

    model: GPT
    tokenizer: Any
    cfg: Config
    checkpoint: Path
    step: int
    device: torch.device


def load_run(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> LoadedRun:
    """The newest complete checkpoint of `path` (a run directory, its checkpoints folder or one step directory);
    checksums of the files read are verified unless `verify` is False."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"run directory {p} does not exist")
    state, cfg, ckpt = read_checkpoint(p, verify=verify)  # CheckpointError: no complete checkpoint under it
    # A multi-token prediction run's next-token model: its tensors without the extra modules' (engine.model.mtp)
    state = {k: v for k, v in state.items() if not k.startswith("mtp.")}
    model = model_from_state(state, cfg.model, source=str(ckpt))
    device = torch.device(device)
    tokenizer = load_data_sources(cfg).tokenizer
    step = int(read_manifest(ckpt).get("step", -1))
    return LoadedRun(model.to(device).eval(), tokenizer, cfg, ckpt, step, device)
