"""Evaluating a trained run: validation loss and perplexity on held-out data, and zero/few-shot multiple-choice
tasks scored by log-likelihood (`python -m engine.evaluation RUN_DIR`; docs/evaluation.md).

`engine.training.evaluate` is the trainer's in-loop validation loss; this package loads a finished run's newest
checkpoint, in whatever layout it was saved, and reuses that loss for its perplexity.
"""
