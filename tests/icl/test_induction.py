"""Induction-head probe (engine/icl/induction.py) and the plotting path (engine/icl/plots.py).

The phase change itself needs hundreds of steps at 512 tokens (examples/icl_induction_heads.py, README); a tiny run
under 30 s on 2 cores did not show it robustly, so these tests check the data, the score's indexing, the per-token
loss and the training/plotting plumbing."""

import json

import pytest
import torch

from engine.icl.induction import InductionTraining, icl_score, per_token_loss, repeated_sequences, train_induction
from engine.icl.plots import have_matplotlib, plot_curves
from engine.model.gpt import GPT


def test_sequences_repeat_with_a_period_between_a_quarter_and_half_the_length():
    tokens = repeated_sequences(32, 64, 50, torch.Generator().manual_seed(0))
    assert tokens.shape == (32, 64) and tokens.min() >= 0 and tokens.max() < 50
    for row in tokens:
        periods = [p for p in range(16, 33) if torch.equal(row[p:], row[:-p])]
        assert periods, "no period in [16, 32]"
    with pytest.raises(ValueError, match="seq_len >= 8"):
        repeated_sequences(1, 4, 10, torch.Generator())


def test_icl_score_is_late_minus_early_with_one_based_token_indices():
    losses = torch.arange(511, dtype=torch.float)  # entry i scores token i + 2
    assert icl_score(losses) == pytest.approx((500 - 2) - (50 - 2))
    losses[498], losses[48] = 1.0, 3.0
    assert icl_score(losses) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="early"):
        icl_score(losses, early=60, late=50)


def test_per_token_loss_averages_to_the_model_loss():
    run = InductionTraining(seq_len=32, vocab=16, d_model=16, n_heads=2)
    model = GPT(run.model_config(), seed=0)
    tokens = repeated_sequences(4, 32, 16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        losses = per_token_loss(model, tokens)
        assert losses.shape == (31,)
        assert losses.mean().item() == pytest.approx(model(tokens[:, :-1], tokens[:, 1:]).item(), rel=1e-5)


def test_training_records_the_score_and_plots(tmp_path):
    run = InductionTraining(seq_len=32, vocab=16, d_model=16, n_heads=2, steps=4, batch=2, eval_every=2,
                            eval_batch=4, early=5, late=30)
    _, history = train_induction(run)
    assert [h["step"] for h in history] == [0, 2, 4]
    assert all(h["icl_score"] == pytest.approx(h["loss_late"] - h["loss_early"]) for h in history)
    json.dumps(history)
    path = plot_curves({"ICL score": [h["icl_score"] for h in history]}, tmp_path / "score.png", "step", "nats",
                       "t", xs=[h["step"] for h in history])
    if have_matplotlib():
        assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert path is None
