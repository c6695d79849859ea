"""Induction-head probe (engine/icl/induction.py) and the plotting path (engine/icl/plots.py): the data, the ICL
score's indexing, the attention hooks and scores, and the phase change itself at a small budget."""

import json
import math

import pytest
import torch

from engine.icl.induction import (
    InductionTraining,
    capturing_attention,
    icl_score,
    induction_scores,
    induction_targets,
    per_token_loss,
    phase_change,
    previous_token_scores,
    repeated_sequences,
    repeated_targets,
    train_induction,
)
from engine.icl.plots import have_matplotlib, plot_curves
from engine.model.gpt import GPT


def test_sequences_repeat_with_a_period_between_a_quarter_and_half_the_length():
    tokens, periods = repeated_sequences(32, 64, 50, torch.Generator().manual_seed(0))
    assert tokens.shape == (32, 64) and tokens.min() >= 0 and tokens.max() < 50
    assert periods.min() >= 16 and periods.max() <= 32
    for row, period in zip(tokens, periods.tolist()):
        assert torch.equal(row[period:], row[:-period])
    mask = repeated_targets(periods, 63)  # entry t predicts 0-based token t + 1
    assert mask[0].sum() == 64 - periods[0] and not mask[0, periods[0] - 2] and mask[0, periods[0] - 1]
    with pytest.raises(ValueError, match="seq_len >= 8"):
        repeated_sequences(1, 4, 10, torch.Generator())


def test_icl_score_is_late_minus_early_with_one_based_token_indices():
    losses = torch.arange(511, dtype=torch.float)  # entry i scores token i + 2
    assert icl_score(losses) == pytest.approx((500 - 2) - (50 - 2))
    losses[498], losses[48] = 1.0, 3.0
    assert icl_score(losses) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="early"):
        icl_score(losses, early=60, late=50)


def test_induction_targets_are_the_tokens_after_earlier_occurrences():
    # period 3, 0-based tokens a b c a b c a: query 3 (a) -> key 1 (b); query 6 (a) -> keys 1 and 4
    targets = induction_targets(torch.tensor([3]), 7)[0]
    assert [j for j in range(7) if targets[3, j]] == [1] and [j for j in range(7) if targets[6, j]] == [1, 4]
    assert not targets[:3].any()  # the first copy has no earlier occurrence
    probs = torch.zeros(1, 2, 7, 7)  # head 0 a perfect induction head, head 1 a perfect previous-token head
    for i in range(7):
        probs[0, 0, i, i] = 1.0
        probs[0, 1, i, max(i - 1, 0)] = 1.0
    for i in range(3, 7):
        probs[0, 0, i] = targets[i] / targets[i].sum()
    assert induction_scores(probs, torch.tensor([3])).tolist() == pytest.approx([1.0, 0.0])
    assert previous_token_scores(probs).tolist() == pytest.approx([0.0, 1.0])


def test_captured_attention_reproduces_the_layer_output_and_per_token_loss_the_model_loss():
    run = InductionTraining(seq_len=32, vocab=16, d_model=16, n_heads=2)
    model = GPT(run.model_config(), seed=0)
    tokens, _ = repeated_sequences(4, 32, 16, torch.Generator().manual_seed(1))
    seen = {}
    hook = model.layers["1"].attn.core.register_forward_hook(lambda m, args, out: seen.update(v=args[2], out=out))
    with torch.no_grad(), capturing_attention(model) as probs:
        losses = per_token_loss(model, tokens)
    hook.remove()
    assert sorted(probs) == [1, 2] and probs[2].shape == (4, 2, 31, 31)
    recomputed = torch.einsum("bhqk,bkhd->bqhd", probs[2], seen["v"])
    torch.testing.assert_close(recomputed, seen["out"], atol=1e-6, rtol=1e-5)
    assert losses.shape == (4, 31)
    with torch.no_grad():
        assert losses.mean().item() == pytest.approx(model(tokens[:, :-1], tokens[:, 1:]).item(), rel=1e-5)


def test_phase_change_finds_the_fastest_fall():
    losses = [4.0, 3.95, 3.9, 3.8, 2.0, 0.5, 0.4, 0.4]
    change = phase_change([{"step": 10 * i, "loss": v} for i, v in enumerate(losses)], "loss", span=2)
    assert (change["from_step"], change["to_step"], change["step"]) == (30, 50, 40)
    assert change["fall"] == pytest.approx(3.3) and change["fall_before"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="evaluations"):
        phase_change([{"step": 0, "loss": 1.0}] * 4, "loss", span=2)


# The phase change at a small budget (400 steps of 32 sequences of 48 tokens; about 5 s on 2 idle cores): the loss
# on repeated tokens drifts down slowly (in-context token statistics), then falls within ~40 steps as layer 1's
# previous-token head and layer 2's induction head form. Seeds 0-4 gave falls of 0.58-0.70 nats in the 40 steps of
# the change against 0.11-0.18 in the 40 before, previous-token scores 0.09-0.11 -> 0.25-0.36 across them, a last
# ICL score of -1.51 to -2.15 (-0.32 to -0.66 before the change) and a last induction score of 0.42-0.44 (0.04 at
# initialisation).
SMALL = dict(seq_len=48, vocab=32, d_model=32, n_heads=1, steps=400, batch=32, lr=3e-3, warmup=50, eval_every=20,
             eval_batch=64, early=5, late=47, seed=0)


def test_the_phase_change_shows_at_a_small_budget(tmp_path):
    _, history = train_induction(InductionTraining(**SMALL))
    change = phase_change(history, span=2)
    at = {h["step"]: h for h in history}
    before, after, last = at[change["from_step"]], at[change["to_step"]], history[-1]
    assert change["fall"] > 0.4 and change["fall"] > 3 * change["fall_before"]
    assert before["previous_token_score"] < 0.2 and after["previous_token_score"] > 0.2
    assert before["icl_score"] > -1.0 and last["icl_score"] < -1.2
    assert history[0]["induction_score"] < 0.1 and last["induction_score"] > 0.35
    assert last["repeat_loss"] < math.log(32) - 1.0
    assert all(h["icl_score"] == pytest.approx(h["loss_late"] - h["loss_early"]) for h in history)
    json.dumps(history)
    path = plot_curves({"ICL score": [h["icl_score"] for h in history]}, tmp_path / "score.png", "step", "nats",
                       "t", xs=[h["step"] for h in history], vline=change["step"])
    if have_matplotlib():
        assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert path is None
