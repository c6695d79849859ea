"""Fill in the middle with a FIM-trained checkpoint (train one with examples/pretrain_fim_code.py).

    python examples/infill.py --checkpoint RUN_DIR|CKPT_DIR --prefix TEXT --suffix TEXT [--temperature 0.8] ...

Builds the PSM prompt `<PRE> prefix <SUF> suffix <MID>` from the tokenizer's FIM sentinels, samples the middle with
engine.model.generate until EOD (or --max-new tokens), and prints the filled-in text, prefix + middle + suffix
(`--middle-only`: just the middle). The model and tokenizer come from the checkpoint, as in examples/generate.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import engine  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if str(Path(__file__).resolve().parent) not in sys.path:  # imported from elsewhere (tests): find generate.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from generate import TokenizerIds, load_model

from engine.checkpoint.checkpointer import CheckpointError
from engine.config import ConfigError


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/fim_code", help="a run directory, checkpoints root or step directory")
    text = p.add_argument_group("the text around the gap")
    text.add_argument("--prefix", default="def add(a, b):\n", help="text before the gap")
    text.add_argument("--suffix", default="\n    return c\n", help="text after the gap")
    text.add_argument("--middle-only", action="store_true", help="print only the generated middle")
    sampling = p.add_argument_group("sampling (engine.model.generate)")
    sampling.add_argument("--max-new", type=int, default=100, help="most middle tokens (capped by the context)")
    sampling.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    sampling.add_argument("--top-k", type=int, default=40, help="0: no top-k filter")
    sampling.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.max_new < 1 or args.temperature < 0 or args.top_k < 0:
            raise ConfigError("--max-new must be >= 1, --temperature and --top-k >= 0")
        model, tok, cfg = load_model(args.checkpoint, args.device)
        try:
            pre, mid, suf, eod = tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.eod_id
        except KeyError as e:
            raise ConfigError(f"the checkpoint's tokenizer has no {e} sentinel, so it cannot prompt FIM") from None
        prompt = [pre, *tok.encode(args.prefix), suf, *tok.encode(args.suffix), mid]
        room = model.cfg.seq_len - len(prompt)
        if room < 1:
            raise ConfigError(f"prefix + suffix take {len(prompt)} tokens; the model's context is {model.cfg.seq_len}")
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.train.objective != "fim":
        print(f"warning: the checkpoint was trained with objective {cfg.train.objective}, not fim", file=sys.stderr)
    from engine.model.generate import generate

    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    ids = torch.tensor([prompt], dtype=torch.long, device=args.device)
    model = TokenizerIds(model, tok.vocab_size)
    out = generate(model, ids, min(args.max_new, room), temperature=args.temperature, top_k=args.top_k or None,
                   eos_id=eod, generator=gen)[0, len(prompt) :].tolist()  # fmt: skip
    middle = tok.decode(out[: out.index(eod)] if eod in out else out)
    print(middle if args.middle_only else args.prefix + middle + args.suffix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
