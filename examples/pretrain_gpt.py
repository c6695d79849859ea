"""Pretrain a GPT: `torchrun --nproc-per-node N examples/pretrain_gpt.py [--config F.toml] [--section.key value ...]`.

With no flags it trains the tiny default model (engine/config.py, the same as configs/tiny.toml) on the embedded
corpus, on CPU (gloo) or GPU (nccl). All flags are those of `python -m engine.train` (README.md, Configuration).
"""

import sys
from pathlib import Path

try:
    import engine  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.train import main

if __name__ == "__main__":
    sys.exit(main())
