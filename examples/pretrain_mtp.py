"""Multi-token prediction pretraining: `torchrun --nproc-per-node N examples/pretrain_mtp.py [--flags]`.

Trains with `--train.objective mtp` (engine/model/mtp.py): the next-token model plus `--objective.mtp_depth`
prediction modules, DeepSeek-V3's sequential ones by default or Gloeckle et al. 2024's parallel heads with
`--objective.mtp_kind parallel`, weighted by `--objective.mtp_lambda`. The recipe's depth is 2 (the config's default
is 1), so examples/mtp_speculative.py can draft two tokens ahead. With no flags: the tiny default model on the
embedded corpus, into runs/mtp unless `--run.dir` (or a --config) says otherwise. Every flag is that of
`python -m engine.train` (README.md, Configuration); the recipe's defaults come first, so a flag overrides them.
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
    argv, _ = recipe_argv(["--objective.mtp_depth", "2", *(sys.argv[1:] if argv is None else argv)], "mtp", "runs/mtp")
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
