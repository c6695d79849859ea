"""`python -m engine.convert from-hf|to-hf`: Hugging Face Llama / GPT-2 weights into a run directory and back.

    from-hf HF_DIR RUN_DIR [--config F.toml] [--section.key value ...]
        HF_DIR (config.json + model.safetensors or a sharded index) -> RUN_DIR/config.toml and
        RUN_DIR/checkpoints/step_00000000, which `python -m engine.train --config RUN_DIR/config.toml` resumes
        (fine-tunes) in any layout. The flags are the trainer's (data, optim, train, ...); the model's shape comes
        from config.json, only model.kernels, model.recompute, model.dropout (and a Llama's model.seq_len) may be
        set. With a tokenizer.json in HF_DIR, data.tokenizer is set to its copy in RUN_DIR/hf/, and the vocabulary
        is padded with zero rows when our reserved ids (engine.data.tokenizer) need more than the model has.
    to-hf PATH HF_DIR [--dtype fp32|bf16|fp16] [--no-verify] [--force]
        the checkpoint at PATH (a run directory, its checkpoints folder or a step directory; any tp / pp / FSDP2
        layout, assembled through the checkpoint reader) -> HF_DIR/config.json + model.safetensors (+ the tokenizer
        files and token ids kept in RUN_DIR/hf/ by from-hf, and its vocabulary size: padding sliced off).

Errors are one line on stderr and exit status 2 (ENGINE_DEBUG=1: a traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from engine.checkpoint.checkpointer import CheckpointError, complete_checkpoints
from engine.config import ConfigError, load_config
from engine.convert.api import export_state, hf_model_config, model_from_state
from engine.convert.hf_config import ConvertError
from engine.convert.hf_files import INDEX, WEIGHTS, copy_tokenizer, read_config, read_weights
from engine.convert.run_dir import HF_SUBDIR, hf_source, merge_model, read_checkpoint, user_keys, write_run_dir
from engine.convert.weights import hf_to_ours

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like the engine's other errors, instead of usage + error
        raise ConvertError(f"{self.prog}: {message}")


def _from_hf(args: argparse.Namespace, rest: list[str]) -> str:
    hf_dir, run_dir = Path(args.hf_dir), Path(args.run_dir)
    hf_cfg, _ = hf_model_config(hf_dir)  # a missing directory or an unsupported model fails before anything else
    if complete_checkpoints(run_dir / "checkpoints"):
        raise ConvertError(f"{run_dir} already holds checkpoints; convert into a new run directory")
    cfg = load_config(rest)
    keys = user_keys(rest)
    overridden = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    tokenizer_json = hf_dir / "tokenizer.json"
    note = ""
    if tokenizer_json.is_file() and "data.tokenizer" not in keys:
        from engine.data.tokenizer import load_tokenizer_json

        needed = load_tokenizer_json(str(tokenizer_json)).vocab_size  # with our reserved ids added
        if needed > hf_cfg.vocab_size:
            note = f"; vocabulary padded {hf_cfg.vocab_size} -> {needed} for the tokenizer's reserved ids"
            hf_cfg, _ = hf_model_config(hf_dir, vocab_size=needed)
        cfg.data.tokenizer = str((run_dir / HF_SUBDIR / "tokenizer.json").resolve())
    elif "data.tokenizer" not in keys and cfg.data.tokenizer == "bpe" and hf_cfg.vocab_size < cfg.data.bpe_vocab:
        # the weights convert, but training this run as configured would fail on the vocabulary: say so now
        note += (f"; note: {hf_dir} has no tokenizer.json and its vocabulary ({hf_cfg.vocab_size}) is smaller than "
                 f"the default tokenizer's (bpe, {cfg.data.bpe_vocab}): to train it, convert again with "
                 "--data.tokenizer (byte, or a tokenizer.json)")  # fmt: skip
    cfg.model = merge_model(hf_cfg, cfg.model, overridden, str(hf_dir / "config.json"))
    model = model_from_state(hf_to_ours(read_weights(hf_dir), cfg.model, str(hf_dir)), cfg.model, str(hf_dir))
    (run_dir / HF_SUBDIR).mkdir(parents=True, exist_ok=True)
    (run_dir / HF_SUBDIR / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    copy_tokenizer(hf_dir, run_dir / HF_SUBDIR)
    ckpt = write_run_dir(model, cfg, run_dir)
    n = sum(p.numel() for p in model.parameters())
    return (f"wrote {ckpt}: {cfg.model.arch}, {cfg.model.n_layers} layers, {n:,} parameters{note}; train with "
            f"python -m engine.train --config {run_dir / 'config.toml'}")  # fmt: skip


def _to_hf(args: argparse.Namespace, rest: list[str]) -> str:
    if rest:
        raise ConvertError(f"to-hf: unexpected argument '{rest[0]}'")
    out = Path(args.hf_dir)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} exists and is not a directory")
    if any((out / n).exists() for n in ("config.json", WEIGHTS, INDEX)) and not args.force:
        raise ConvertError(f"{out} already holds a model (--force overwrites it)")
    state, cfg, ckpt = read_checkpoint(args.path, verify=not args.no_verify)
    src = hf_source(ckpt)
    base = read_config(src) if src is not None else None
    vocab = None
    if base is not None and base.get("vocab_size") and int(base["vocab_size"]) < cfg.model.vocab_size:
        vocab = int(base["vocab_size"])  # the padding from-hf added for the reserved ids comes off
    export_state(state, cfg.model, out, vocab_size=vocab, dtype=_DTYPES.get(args.dtype), base=base, copy_from=src)
    return f"wrote {out}: {cfg.model.arch} from {ckpt} (step {ckpt.name.removeprefix('step_').lstrip('0') or 0})"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.convert", allow_abbrev=False,
                description="Hugging Face weights into a run directory and back.")  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("from-hf", allow_abbrev=False,
                       help="a Hugging Face Llama/GPT-2 directory -> a run directory at step 0")  # fmt: skip
    c.add_argument("hf_dir", help="config.json + model.safetensors (or model.safetensors.index.json)")
    c.add_argument("run_dir", help="the run directory to create (must hold no checkpoints)")
    c.set_defaults(func=_from_hf)
    c = sub.add_parser("to-hf", allow_abbrev=False, help="a checkpoint (any layout) -> a Hugging Face directory")
    c.add_argument("path", help="a run directory, its checkpoints folder, or a step_XXXXXXXX directory")
    c.add_argument("hf_dir", help="the directory to write config.json and model.safetensors into")
    c.add_argument("--dtype", choices=sorted(_DTYPES), help="cast floating-point tensors (default: as stored)")
    c.add_argument("--no-verify", action="store_true", help="skip the checksums of the files read")
    c.add_argument("--force", action="store_true", help="overwrite a model already in HF_DIR")
    c.set_defaults(func=_to_hf)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args, rest = _parser().parse_known_args(argv)
        print(args.func(args, rest), flush=True)
        return 0
    except (ConvertError, ConfigError, CheckpointError, OSError) as e:  # ConfigError covers the model's shape checks
        if os.environ.get("ENGINE_DEBUG", "") not in ("", "0"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
