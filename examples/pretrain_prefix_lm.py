"""Prefix-LM pretraining: `torchrun --nproc-per-node N examples/pretrain_prefix_lm.py [--flags]`.

Trains with `--train.objective prefix` (Raffel et al. 2020, sec. 3.2.1, the decoder-only "prefix LM"): each packed row
gets a prefix length P drawn uniformly in [`--objective.prefix_min_frac`, `--objective.prefix_max_frac`] of its length
(default the whole range [0, 1]); attention is bidirectional over the first P positions and causal after them, and the
loss covers only the tokens after the prefix. The same model then generates left to right conditioned on a
bidirectionally read prompt. With no flags: the tiny default model on the embedded corpus, into runs/prefix_lm unless
`--run.dir` (or a --config) says otherwise; tp, pp, dp, dp_shard and cp with `--parallel.cp_impl alltoall` apply (ring
cp is refused). Every flag is that of `python -m engine.train` (README.md, Configuration).
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

RUN_DIR = "runs/prefix_lm"


def main(argv: list[str] | None = None) -> int:
    """engine.train.main with the prefix objective, into RUN_DIR unless the flags choose a run directory."""
    return train_main(recipe_argv(list(sys.argv[1:] if argv is None else argv), "prefix", RUN_DIR)[0])


if __name__ == "__main__":
    sys.exit(main())
