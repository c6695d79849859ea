"""Encoder-decoder pretraining: `torchrun --nproc-per-node N examples/pretrain_t5.py [--flags]`.

Trains `--model.arch t5` (engine/model/encoder_decoder.py: a bidirectional encoder and a decoder with
cross-attention, built from the engine's Llama-style blocks) with T5 span corruption (`--train.objective span`,
Raffel et al. 2020, sec. 3.1.4: 15% of the tokens in spans of mean length 3 replaced by sentinels, the decoder
writing out the spans), or with UL2's mixture of denoisers when the flags say `--train.objective ul2` (Tay et al.
2022: R, X and S denoisers announced by mode tokens; rates `--objective.ul2_r_rate` / `ul2_x_rate` / `ul2_s_rate`).
The encoder reads exactly `--model.seq_len` tokens; `--model.n_decoder_layers` sets the decoder's depth (default:
`--model.n_layers`). With no flags: the tiny default model on the embedded corpus, into runs/t5 unless `--run.dir` (or a
--config) says otherwise; tp (with or without sp), cp, dp and dp_shard apply, pp is refused. Every flag is that of
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

RUN_DIR = "runs/t5"


def main(argv: list[str] | None = None) -> int:
    """engine.train.main with the t5 model and span corruption (the flags may choose ul2), into RUN_DIR unless the
    flags choose a run directory."""
    argv = ["--model.arch", "t5", *(sys.argv[1:] if argv is None else argv)]
    return train_main(recipe_argv(argv, "span", RUN_DIR)[0])


if __name__ == "__main__":
    sys.exit(main())
