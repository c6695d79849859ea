"""`from_hf` and `to_hf`: a Hugging Face Llama or GPT-2 directory <-> our plain `GPT` and its `ModelConfig`.

    model, model_cfg = from_hf("path/to/hf_dir")      # model(tokens) -> logits (batch, seq, vocab), fp32, eval mode
    to_hf(model, model_cfg, "path/to/out_dir")          # config.json + model.safetensors, loadable by transformers

The vocabulary is the Hugging Face one exactly (no padding to a multiple of 64), so the logits are transformers'
on the same tokens. Weights are converted to fp32, our master-weight dtype. A run directory (what the trainer
resumes) is `engine.convert.run_dir`'s; `python -m engine.convert` does both from the command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import ModelConfig
from engine.convert.hf_config import ConvertError, hf_config_from_model, model_config_from_hf
from engine.convert.hf_files import read_config, read_weights, write_model
from engine.convert.weights import hf_to_ours, ours_to_hf
from engine.model.gpt import GPT, resolve
from engine.model.init import canonical_name, materialize_
from engine.parallel.sharding import sharding_of


def hf_model_config(hf_dir: str | Path, vocab_size: int | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """(our resolved ModelConfig, the Hugging Face config dict) of a Hugging Face directory; `vocab_size` larger
    than the Hugging Face vocabulary pads it (zero rows)."""
    hf = read_config(hf_dir)
    cfg = model_config_from_hf(hf, source=str(Path(hf_dir) / "config.json"))
    if vocab_size is not None:
        if vocab_size < cfg.vocab_size:
            raise ConvertError(f"vocab_size {vocab_size} is smaller than the Hugging Face model's {cfg.vocab_size}")
        cfg.vocab_size = vocab_size
    return resolve(cfg), hf


def _check_shapes(state: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """Every tensor of `state` has the shape GPT(cfg) gives it (one line naming the first that does not)."""
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in GPT(cfg).state_dict().items()}
    for name, t in state.items():
        if name in expected and tuple(t.shape) != expected[name]:
            raise ConvertError(f"{source}: {name} has shape {tuple(t.shape)}, the {cfg.arch} config's {expected[name]}")


def model_from_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "the weights") -> GPT:
    """A plain GPT on the CPU in eval mode holding `state` (ours; a tied weight under `tok_emb.weight` alone)."""
    _check_shapes(state, cfg, source)
    with torch.device("meta"):
        model = GPT(cfg)
    materialize_(model, "cpu")  # allocated, not initialised: every tensor is loaded below
    model.init_buffers()
    full = dict(state)
    if cfg.tie_embeddings:
        full["output.proj.weight"] = full["tok_emb.weight"]
    model.load_state_dict(full, strict=True)
    return model.eval()


def from_hf(path: str | Path, vocab_size: int | None = None) -> tuple[GPT, ModelConfig]:
    """(our GPT holding the Hugging Face model's weights, its ModelConfig). `model(tokens)` gives the logits
    (batch, seq, vocab); `vocab_size` pads the vocabulary (zero rows) past the Hugging Face one."""
    cfg, _ = hf_model_config(path, vocab_size)
    state = hf_to_ours(read_weights(path), cfg, source=str(path))
    return model_from_state(state, cfg, source=str(path)), cfg


def plain_state(model: nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict of a plain (unsharded) GPT by canonical names."""
    if sharding_of(model).tp_group is not None or any(hasattr(p, "device_mesh") for p in model.parameters()):
        raise ConvertError("to_hf takes a plain GPT; convert a sharded run through its checkpoint "
                           "(python -m engine.convert to-hf RUN_DIR HF_DIR)")  # fmt: skip
    return {canonical_name(n): t.detach().cpu() for n, t in model.state_dict().items()}


def to_hf(model: nn.Module, model_config: ModelConfig, path: str | Path, *, vocab_size: int | None = None,
          dtype: torch.dtype | None = None, base: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Writes `model` (a plain GPT) as a Hugging Face directory: config.json and model.safetensors. `vocab_size`
    slices a padded vocabulary back, `dtype` casts the floating tensors, `base` (the config.json the model came
    from) supplies the token ids."""
    cfg = resolve(model_config)
    return export_state(plain_state(model, cfg), cfg, path, vocab_size=vocab_size, dtype=dtype, base=base)


def export_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig, path: str | Path, *,
                 vocab_size: int | None = None, dtype: torch.dtype | None = None, base: dict[str, Any] | None = None,
                 copy_from: str | Path | None = None) -> Path:  # fmt: skip
    """Our state dict -> a Hugging Face directory (see `to_hf`); `copy_from`: a directory whose tokenizer files
    are copied along."""
    if vocab_size is not None and not 0 < vocab_size <= cfg.vocab_size:
        raise ConvertError(f"vocab_size {vocab_size} must be in 1..{cfg.vocab_size} (the model's vocabulary)")
    _check_shapes(state, cfg, "the model")
    config = hf_config_from_model(cfg, vocab_size, base)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    return write_model(path, config, ours_to_hf(state, cfg, vocab_size, dtype), copy_from)
