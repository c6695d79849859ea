"""In-context linear regression (engine/icl/linear_regression.py, regression_transformer.py).

The qualitative result (the trained model beats averaging and 3-NN at every k >= 1 and its error falls with k) needs
thousands of steps, about 8 minutes on one core at d = 5 (examples/icl_linear_regression.py, README); a few hundred
steps leave the model near predicting 0. These tests check the prompts, the three baselines against their
definitions, the lr schedule, the model's causal read-out and that training fits."""

import pytest
import torch

from engine.icl.linear_regression import (
    averaging_predictions,
    interleave,
    least_squares_predictions,
    nearest_neighbour_predictions,
    normalized_squared_error,
    sample_prompts,
)
from engine.icl.regression_transformer import (
    RegressionTraining,
    RegressionTransformer,
    evaluate_regression,
    train_regression,
)

D, N = 5, 9


def _prompts(batch=200, seed=0, active_dims=None):
    return sample_prompts(batch, N, D, torch.Generator().manual_seed(seed), active_dims=active_dims)


def test_interleave_puts_y_in_the_first_coordinate_of_every_second_token():
    xs, ys = _prompts(2)
    tokens = interleave(xs, ys)
    assert tokens.shape == (2, 2 * N, D)
    torch.testing.assert_close(tokens[:, ::2], xs)
    torch.testing.assert_close(tokens[:, 1::2, 0], ys)
    assert tokens[:, 1::2, 1:].abs().max() == 0


def test_least_squares_is_exact_from_d_examples_and_min_norm_before():
    xs, ys = _prompts()
    err = normalized_squared_error(least_squares_predictions(xs, ys), ys, D)
    assert err[D:].max() < 1e-8
    assert (err[1:D] > 0.05).all() and (err[1:D].diff() < 0).all()  # fewer equations than unknowns
    # Min-norm solution for k < d: w_hat = X^T (X X^T)^-1 y.
    x, y = xs[0, :2].double(), ys[0, :2].double()
    w_hat = x.T @ torch.linalg.solve(x @ x.T, y)
    assert least_squares_predictions(xs[:1], ys[:1])[0, 2].item() == pytest.approx((xs[0, 2].double() @ w_hat).item())


def test_averaging_and_nearest_neighbours_follow_their_definitions():
    xs, ys = _prompts(3)
    i = 6
    w_hat = (ys[:, :i, None] * xs[:, :i]).mean(1)
    torch.testing.assert_close(averaging_predictions(xs, ys)[:, i], (w_hat * xs[:, i]).sum(-1))
    dist = (xs[:, :i] - xs[:, i : i + 1]).norm(dim=-1)
    nearest = dist.argsort(dim=1)[:, :3]
    torch.testing.assert_close(nearest_neighbour_predictions(xs, ys)[:, i], ys[:, :i].gather(1, nearest).mean(1))
    assert nearest_neighbour_predictions(xs, ys)[:, 2].tolist() == pytest.approx(ys[:, :2].mean(1).tolist())
    assert averaging_predictions(xs, ys)[:, 0].abs().max() == 0  # no examples: predict 0


def test_curriculum_zeroes_the_inactive_dimensions_and_grows():
    xs, _ = _prompts(4, active_dims=2)
    assert xs[..., 2:].abs().max() == 0 and xs[..., :2].abs().min() > 0
    run = RegressionTraining(d=8, n_points=17, curriculum_start=5, curriculum_every=10)
    assert [run.curriculum(s) for s in (0, 10, 29, 30, 100)] == [(5, 11), (6, 13), (7, 15), (8, 17), (8, 17)]
    with pytest.raises(ValueError, match="active_dims"):
        sample_prompts(1, 2, 3, torch.Generator(), active_dims=4)


def test_lr_warms_up_then_decays_by_a_cosine_to_the_floor():
    run = RegressionTraining(steps=13, warmup=2, min_lr_ratio=0.1)
    factors = [run.lr_factor(s) for s in range(13)]
    assert factors[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert factors[-1] == pytest.approx(0.1) and factors[7] == pytest.approx(0.55)  # half-way down the cosine
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert {RegressionTraining(steps=12, warmup=2).lr_factor(s) for s in range(2, 12)} == {1.0}


def test_prediction_at_x_i_sees_only_earlier_examples():
    model = RegressionTransformer(D, RegressionTraining(d=D, n_points=N).model_config())
    xs, ys = _prompts(2)
    base = model.predict(xs, ys)
    ys2, xs2 = ys.clone(), xs.clone()
    ys2[:, 4:] += 1.0
    xs2[:, 5:] += 1.0
    changed = model.predict(xs2, ys2)
    torch.testing.assert_close(changed[:, :5], base[:, :5])
    assert (changed[:, 5:] - base[:, 5:]).abs().min() > 0


def test_the_model_fits_a_fixed_batch():
    """80 Adam steps on 16 fixed prompts cut the error by more than 5x (memorising, not in-context learning: that
    needs fresh prompts and thousands of steps, see the module docstring)."""
    model = RegressionTransformer(D, RegressionTraining(d=D, n_points=N, n_layers=1, d_model=32, n_heads=2)
                                  .model_config(), seed=0)
    xs, ys = _prompts(16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = (model.predict(xs, ys) - ys).square().mean() / D
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5


def test_training_logs_the_curriculum_and_evaluation_covers_every_k():
    run = RegressionTraining(d=D, n_points=N, n_layers=1, d_model=16, n_heads=2, steps=4, batch=8,
                             curriculum_start=3, curriculum_every=2, seed=0)
    model, log = train_regression(run)
    assert [(r["dims"], r["points"]) for r in log] == [(3, 5), (3, 5), (4, 7), (4, 7)]
    curves = evaluate_regression(model, D, N, prompts=64)
    assert set(curves) == {"transformer", "least squares", "3-nearest neighbours", "averaging"}
    assert all(len(c) == N for c in curves.values())
