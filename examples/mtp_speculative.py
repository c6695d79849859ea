"""Self-speculative decoding with a multi-token prediction checkpoint:
`python examples/mtp_speculative.py --checkpoint runs/mtp [--prompt TEXT] [--max-new N] [--draft K]`.

The model's own MTP modules draft K tokens past the main head's next token and the main head verifies them in one
forward pass (greedy speculative decoding, as DeepSeek-V3 sec. 2.2 and Gloeckle et al. 2024 sec. 3.2 suggest for
their modules): the drafts are accepted up to the first one the main head would not have chosen, and the main
head's own choice there is appended too. The text is the main head's greedy decoding (while it fits in the model's
window); the script prints it and the acceptance rate (accepted / drafted tokens) and the tokens gained per
verification. A demonstration of the acceptance rate, not of speed: every pass recomputes the whole window (no KV
cache, and the drafting reruns the trunk). Train a checkpoint with examples/pretrain_mtp.py (depth 2).
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
from generate import load_model

from engine.checkpoint.checkpointer import CheckpointError
from engine.config import ConfigError
from engine.model.mtp import MultiTokenGPT

OPTIONS = (  # flag, type, default, help
    ("--checkpoint", str, "runs/mtp", "a run directory, checkpoints root or step directory"),
    ("--prompt", str, "def ", "text to continue"),
    ("--max-new", int, 100, "tokens to generate"),
    ("--draft", int, 0, "tokens drafted per step (0: the checkpoint's mtp_depth)"),
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default, text in OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=text)
    return p.parse_args(argv)


def load_mtp_model(checkpoint: str) -> tuple[MultiTokenGPT, object]:
    """(model with its MTP modules, in eval mode, on the CPU; tokenizer) from a `--train.objective mtp` checkpoint."""
    model, tokenizer, cfg = load_model(checkpoint)
    if cfg.train.objective != "mtp":
        raise ConfigError(f"{checkpoint} was trained with train.objective {cfg.train.objective}, not mtp: no drafts")
    return model, tokenizer


@torch.no_grad()
def speculative_greedy(model: MultiTokenGPT, prompt: list[int], max_new: int, draft: int, vocab: int):
    """(prompt + max_new greedy tokens, drafted, accepted, verifications). Each step: the main head's next token
    t_n, then depth k's guess of t_{n+k} (k = 1..draft; a sequential module reads the tokens before it, so each
    draft is appended before the next is made), then one pass of the main head over all of them."""
    if not 1 <= draft <= model.mtp_depth:
        raise ConfigError(f"--draft must be in [1, {model.mtp_depth}] (the checkpoint's mtp_depth), got {draft}")
    window = model.cfg.seq_len - draft - 1  # the context, then t_n and the drafts, fit the model's window
    if window < 1:
        raise ConfigError(f"--draft {draft} leaves no context in model.seq_len {model.cfg.seq_len}")

    def pick(logits: torch.Tensor) -> int:
        return int(logits[:vocab].argmax())

    out, drafted, accepted, verifications = list(prompt), 0, 0, 0
    while len(out) < len(prompt) + max_new:
        ctx = out[-window:]
        last = len(ctx) - 1
        cur = [*ctx, pick(model(torch.tensor([ctx]))[0, -1])]
        for k in range(1, draft + 1):
            cur.append(pick(model.all_logits(torch.tensor([cur]))[k][0, last]))
        main = model(torch.tensor([cur]))[0]  # eval mode, no targets: the main head's logits
        verifications += 1
        m = 0
        while m < draft and pick(main[last + 1 + m]) == cur[last + 2 + m]:
            m += 1
        drafted, accepted = drafted + draft, accepted + m
        out += [*cur[last + 1 : last + 2 + m], pick(main[last + 1 + m])]
    return out[: len(prompt) + max_new], drafted, accepted, verifications


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.max_new < 1 or args.draft < 0:
            raise ConfigError("--max-new must be >= 1 and --draft >= 0")
        model, tokenizer = load_mtp_model(args.checkpoint)
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise ConfigError("--prompt encodes to no tokens; give some text")
        draft = args.draft or model.mtp_depth
        out, drafted, accepted, steps = speculative_greedy(model, ids, args.max_new, draft, tokenizer.vocab_size)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tokenizer.decode(out))
    print(f"acceptance rate {accepted / max(drafted, 1):.3f} ({accepted}/{drafted} drafted tokens accepted), "
          f"{(len(out) - len(ids)) / steps:.2f} tokens per verification ({steps} verifications)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
