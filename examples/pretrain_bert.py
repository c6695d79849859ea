"""Masked-LM pretraining, BERT style: `torchrun --nproc-per-node N examples/pretrain_bert.py [--flags]`.

Trains with `--train.objective mlm` (Devlin et al. 2019: `--objective.mlm_mask_rate` 0.15 of the non-special tokens
selected, 80% masked / 10% random / 10% kept, loss only on the selected positions); the model is the configured
arch's blocks run without the causal mask, a bidirectional encoder. With no flags: the tiny default model on the
embedded corpus, into runs/bert unless `--run.dir` (or a --config) says otherwise. Every flag is that of
`python -m engine.train` (README.md, Configuration).
"""

import sys
from pathlib import Path

try:
    import engine  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if str(Path(__file__).resolve().parent) not in sys.path:  # imported from elsewhere (tests): find the FIM recipe
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_fim_code import recipe_argv

from engine.train import main as train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(recipe_argv(list(sys.argv[1:] if argv is None else argv), "mlm", "runs/bert")[0])


if __name__ == "__main__":
    sys.exit(main())
