"""Fill-in-the-middle pretraining on code: `torchrun --nproc-per-node N examples/pretrain_fim_code.py [--flags]`.

Trains with `--train.objective fim` (Bavarian et al. 2022: PSM/SPM at character level, per document of each packed
sample; rates `--objective.fim_rate` 0.5 and `--objective.fim_spm_rate` 0.5) on the code part of the embedded
corpus: its standard-library `.py` documents (engine/data/corpus.py names them `code/...`; about 94% of the corpus's
bytes; the pydoc prose is left out), in the corpus's own train/valid split, tokenised once with the run's tokenizer into
`$ENGINE_CACHE/embedded_code/<tokenizer>-<corpus>/`. Runs go to runs/fim_code unless `--run.dir` says otherwise;
`--data.path` trains on other data instead. Every other flag is that of `python -m engine.train`. Then fill in a
middle: `python examples/infill.py --checkpoint runs/fim_code --prefix "def add(a, b):" --suffix "    return c"`.
"""

import json
import os
import shutil
import sys
from pathlib import Path

try:
    import engine  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import Config, ConfigError, load_config
from engine.train import main as train_main


def prepare_code(cache_dir: str | None = None, tokenizer: str = "bpe", bpe_vocab: int = 4096) -> tuple[str, str]:
    """(train prefix, valid prefix) of the embedded corpus's code documents, each ending in EOD; built once (under
    a file lock, so the ranks of a job wait for one builder) and reused."""
    from engine.data._files import cache_root, file_lock, fsync_dir, temp_path
    from engine.data.corpus import corpus_key, documents
    from engine.data.embedded import tokenize_to_dataset
    from engine.data.tokenizer import load_tokenizer

    root = cache_root(cache_dir)
    tok = load_tokenizer(tokenizer, root, bpe_vocab)
    directory = os.path.join(root, "embedded_code", f"{tok.fingerprint}-{corpus_key()}")
    done = os.path.join(directory, "meta.json")
    if not os.path.isfile(done):
        with file_lock(directory + ".lock"):
            if not os.path.isfile(done):
                tmp = temp_path(directory)
                os.makedirs(tmp)
                try:
                    meta = {}
                    for split in ("train", "valid"):
                        texts = [d.text for d in documents(split) if d.name.startswith("code/")]
                        meta[split] = tokenize_to_dataset(texts, tok, os.path.join(tmp, split))
                    with open(os.path.join(tmp, "meta.json"), "w") as f:
                        json.dump({"tokenizer": tok.name, "documents_tokens": meta}, f)
                    shutil.rmtree(directory, ignore_errors=True)  # left by a build that died before meta.json
                    os.rename(tmp, directory)
                    fsync_dir(directory)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    return os.path.join(directory, "train"), os.path.join(directory, "valid")


def recipe_argv(argv: list[str], objective: str, run_dir: str) -> tuple[list[str], Config | None]:
    """`--train.objective OBJECTIVE` then `argv`, with `--run.dir RUN_DIR` unless the flags or a --config set one;
    the config too (None when the flags are bad: engine.train.main then reports them in one line)."""
    argv = ["--train.objective", objective, *argv]
    try:
        cfg = load_config(argv)
    except ConfigError:
        return argv, None
    if cfg.run.dir == Config().run.dir:
        argv += ["--run.dir", run_dir]
    return argv, cfg


def main(argv: list[str] | None = None) -> int:
    argv, cfg = recipe_argv(list(sys.argv[1:] if argv is None else argv), "fim", "runs/fim_code")
    if cfg is not None and cfg.data.path == "embedded":
        d = cfg.data
        train, valid = prepare_code(d.cache_dir or None, d.tokenizer, d.bpe_vocab)
        argv += ["--data.path", train] + ([] if d.valid_path else ["--data.valid_path", valid])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
