"""Multi-token prediction modules (engine.model.mtp): the loss is the weighted sum of the shifted cross-entropies it
stands for (sequential modules and parallel heads), depth k sees tokens up to i + k only (a parallel head up to i),
the main model is GPT's, and bad depths, weights and kinds are refused."""

import pytest
import torch
import torch.nn.functional as F

from engine.config import ConfigError, ModelConfig
from engine.model.gpt import GPT
from engine.model.mtp import MultiTokenGPT

CFG = ModelConfig(n_layers=1, d_model=32, n_heads=2, seq_len=16, vocab_size=64)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (2, 16), generator=g)
    y = torch.randint(0, 64, (2, 16), generator=g)
    y[0, 3] = -100  # an ignored label: no term in the main loss, nor in depth k's at position 3 - k
    return x, y


@pytest.mark.parametrize("arch, kind", [("llama", "sequential"), ("gpt2", "sequential"), ("llama", "parallel")])
def test_mtp_loss_is_the_weighted_sum_of_the_shifted_cross_entropies(arch, kind):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CFG.__dict__, "arch": arch})
    model = MultiTokenGPT(cfg, depth=3, weight=0.3, kind=kind, seed=1)
    x, y = _batch()
    logits = model.all_logits(x)
    assert len(logits) == 4 and all(t.shape == (2, 16, 64) for t in logits)
    # By hand: depth k at position i predicts t_{i+k+1} = y[i + k]; positions past the end carry nothing.
    main = F.cross_entropy(logits[0].reshape(-1, 64), y.reshape(-1), reduction="sum")
    depths = [F.cross_entropy(logits[k][:, : 16 - k].reshape(-1, 64), y[:, k:].reshape(-1), reduction="sum")
              for k in (1, 2, 3)]  # fmt: skip
    expected = main + 0.3 / 3 * sum(depths)
    model.train()
    got = model(x, y, reduction="sum")
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    n = (y != -100).sum()
    assert model(x, y).item() == pytest.approx((expected / n).item(), rel=1e-5)  # "mean": over the main tokens
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp.parameters())
    model.eval()  # evaluation: the next-token loss alone
    assert model(x, y, reduction="sum").item() == pytest.approx(main.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_depth_k_sees_the_tokens_up_to_i_plus_k_only(kind):
    """Sequential depth k reads t_{i+k} at position i; a parallel head only the trunk's view, t_0..t_i."""
    model = MultiTokenGPT(CFG, depth=2, kind=kind, seed=1)
    x, _ = _batch()
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 64
    a, b = model.all_logits(x), model.all_logits(x2)
    for k in range(3):  # main, depth 1, depth 2
        reach = k if kind == "sequential" else 0
        assert torch.equal(a[k][:, : 10 - reach], b[k][:, : 10 - reach]), k
        assert not torch.allclose(a[k][:, 10 - reach], b[k][:, 10 - reach]), k


def test_the_main_model_is_gpts_with_the_same_seed():
    mtp, plain = MultiTokenGPT(CFG, depth=2, seed=3), GPT(CFG, seed=3)
    extra = {k for k in mtp.state_dict() if k.startswith("mtp.")}
    assert set(mtp.state_dict()) - extra == set(plain.state_dict()) and len(extra) == 2 * 12
    for k, v in plain.state_dict().items():
        assert torch.equal(mtp.state_dict()[k], v), k
    x, _ = _batch()
    assert torch.equal(mtp(x), plain(x))  # logits without targets: the main model's


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(depth=0), "objective.mtp_depth must be a positive integer, got 0"),
        (dict(depth=1.5), "objective.mtp_depth must be a positive integer, got 1.5"),
        (dict(weight=-0.1), "objective.mtp_lambda must be >= 0, got -0.1"),
        (dict(weight=float("nan")), "objective.mtp_lambda must be >= 0, got nan"),
        (dict(kind="tree"), "objective.mtp_kind must be one of sequential|parallel, got 'tree'"),
    ],
)
def test_bad_depths_and_weights_are_one_line_errors(kw, needle):
    with pytest.raises(ConfigError, match="^" + needle.replace(".", r"\.").replace("(", r"\(") + "$"):
        MultiTokenGPT(CFG, **kw)
