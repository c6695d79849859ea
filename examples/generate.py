"""Sample text from a checkpoint: `python examples/generate.py --checkpoint RUN_DIR|CKPT_DIR [--prompt TEXT] ...`.

Rebuilds the model and tokenizer from the config saved in the checkpoint's manifest, loads the weights (checksums
verified) and samples greedily (`--temperature 0`) or with temperature and top-k.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import engine  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from engine.checkpoint.checkpointer import CheckpointError, resolve_checkpoint_path
from engine.checkpoint.reader import load_checkpoint
from engine.config import Config, ConfigError, load_config


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/default", help="a run directory, checkpoints root or step directory")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-new", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="0: no top-k filter")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


class TokenizerIds(torch.nn.Module):
    """The model with its logits cut to the tokenizer's ids: the model's vocabulary may be larger (padded to a multiple
    of 64, or model.vocab_size), and an id the tokenizer lacks could be sampled but not decoded."""

    def __init__(self, model: torch.nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.model, self.vocab_size, self.cfg = model, vocab_size, model.cfg

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)[..., : self.vocab_size]


def load_model(checkpoint: str, device: str = "cpu") -> tuple[torch.nn.Module, object, Config]:
    """(model in eval mode, tokenizer, config) from a checkpoint path."""
    from engine.checkpoint.state import load_named_parameters
    from engine.model.mtp import build_gpt
    from engine.training.samples import load_data_sources

    path = resolve_checkpoint_path(checkpoint)
    ck = load_checkpoint(path)
    cfg = load_config(["--config", str(path / "config.toml")])
    tokenizer = load_data_sources(cfg).tokenizer
    model = build_gpt(cfg.model, cfg)  # with its multi-token prediction modules when trained with them
    try:
        load_named_parameters(model, ck.tensors["model"])
    except KeyError as e:
        raise CheckpointError(f"{path}: {str(e).strip(chr(39))}") from None
    return model.to(device).eval(), tokenizer, cfg


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.max_new < 0 or args.temperature < 0 or args.top_k < 0 or args.num_samples < 1:
            raise ConfigError("--max-new, --temperature and --top-k must be >= 0 and --num-samples >= 1")
        model, tokenizer, _ = load_model(args.checkpoint, args.device)
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise ConfigError("--prompt encodes to no tokens; give some text")
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from engine.model.generate import generate

    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=args.device)
    out = generate(
        TokenizerIds(model, tokenizer.vocab_size),
        prompt,
        args.max_new,
        temperature=args.temperature,
        top_k=args.top_k or None,
        eos_id=getattr(tokenizer, "eod_id", None),
        generator=gen,
    )
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(tokenizer.decode(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
