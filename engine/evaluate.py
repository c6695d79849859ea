"""`python -m engine.evaluate RUN_DIR ...`: the same command as `python -m engine.evaluation` (validation perplexity
and multiple-choice tasks of a run's newest checkpoint; docs/evaluation.md), under the name the trainer's sibling
commands use (`engine.train`, `engine.convert`)."""

import sys

from engine.evaluation.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
