"""Prefix LM: the mask against its definition (alone and with segment ids), the model between its two ends (prefix 0
is causal, prefix = seq is bidirectional) and its information flow, the labels, the seeded draw, bad input, and the
example recipe."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ModelConfig, load_config
from engine.data.tokenizer import ByteTokenizer
from engine.model import GPT, ops
from engine.model.head import IGNORE_INDEX
from engine.objectives.prefix_lm import draw_prefix_length, prefix_lm_example
from engine.objectives.sample_objective import SampleObjective
from kernels.attention import attention_mask, flash_attention_reference

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _qk(b=3, s=7, h=2, d=4, sk=None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk or s, h, d, generator=g, dtype=torch.float64)
    return q, k


def test_mask_is_its_definition_alone_and_with_segments():
    q, k = _qk(sk=9)  # seq_q 7 < seq_k 9: the causal diagonal is bottom-right aligned, the prefix counts keys
    prefix = torch.tensor([0, 4, 20])
    seg_q = torch.tensor([[0] * 7, [0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    seg_k = torch.tensor([[0] * 9, [0, 0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1, 1]])
    got = attention_mask("t", q, k, True, prefix_lengths=prefix)
    got_seg = attention_mask("t", q, k, True, (seg_q, seg_k), prefix_lengths=prefix)
    assert got.shape == (3, 1, 7, 9)
    for b in range(3):
        for i in range(7):
            for j in range(9):
                seen = j <= i + 2 or j < prefix[b]
                assert bool(got[b, 0, i, j]) == seen, (b, i, j)
                assert bool(got_seg[b, 0, i, j]) == (seen and bool(seg_q[b, i] == seg_k[b, j])), (b, i, j)


def test_torch_attention_with_a_prefix_is_the_reference():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 4, 8, generator=g)
    k, v = torch.randn(2, 6, 2, 8, generator=g), torch.randn(2, 6, 2, 8, generator=g)  # GQA
    prefix = torch.tensor([3, 6])
    got = ops.attention(q, k, v, causal=True, backend="torch", prefix_lengths=prefix)
    ref = flash_attention_reference(q, k, v, True, prefix_lengths=prefix)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    bidir = ops.attention(q[1:], k[1:], v[1:], causal=False, backend="torch")
    torch.testing.assert_close(got[1:], bidir, rtol=1e-5, atol=1e-6)


def test_triton_attention_with_a_prefix_is_the_torch_path():
    """ops.attention's Triton route (the interpreter on CPU) takes the prefix: output and gradients as torch's."""
    g = torch.Generator().manual_seed(4)
    leaves = [torch.randn(2, 20, h, 16, generator=g) for h in (2, 1, 1)]
    prefix = torch.tensor([0, 18])
    results = []
    for backend in ("triton", "torch"):
        q, k, v = (t.clone().requires_grad_() for t in leaves)
        out = ops.attention(q, k, v, causal=True, backend=backend, prefix_lengths=prefix)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for got, ref in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(causal=False, prefix_lengths=torch.tensor([1, 1, 1])), "prefix_lengths needs causal=True"),
        (dict(causal=True, window=2, prefix_lengths=torch.tensor([1, 1, 1])), "with a sliding window"),
        (dict(causal=True, prefix_lengths=torch.tensor([1, 1])), "shape (batch,) = (3,), got (2,)"),
        (dict(causal=True, prefix_lengths=torch.tensor([1.0, 1, 1])), "must be an integer tensor"),
    ],
)
def test_bad_prefix_arguments_are_one_line_errors(kw, needle):
    q, k = _qk()
    with pytest.raises(ValueError) as e:
        attention_mask("attention", q, k, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=16, kernels="torch")
    return GPT(cfg).eval(), torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))


def test_model_prefix_zero_is_causal_and_prefix_seq_is_bidirectional():
    model, x = _model()
    with torch.no_grad():
        causal = model(x)
        bidir = model(x, causal=False)
        zero = model(x, prefix_lengths=torch.tensor([0, 0]))
        whole = model(x, prefix_lengths=torch.tensor([12, 12]))
        mixed = model(x, prefix_lengths=torch.tensor([0, 12]))
    torch.testing.assert_close(zero, causal, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole, bidir, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[0], causal[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], bidir[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(causal, bidir, atol=1e-3)


def test_prefix_positions_see_the_whole_prefix_and_nothing_after_it():
    model, x = _model()
    prefix = torch.tensor([5, 5])
    with torch.no_grad():
        base = model(x, prefix_lengths=prefix)
        after = x.clone()
        after[:, 5] = (after[:, 5] + 1) % 64  # the first token past the prefix
        inside = x.clone()
        inside[:, 4] = (inside[:, 4] + 1) % 64  # the prefix's last token
        moved_after, moved_inside = model(after, prefix_lengths=prefix), model(inside, prefix_lengths=prefix)
    torch.testing.assert_close(moved_after[:, :5], base[:, :5], rtol=0, atol=0)  # never seen by prefix positions
    assert (moved_inside[:, 0] - base[:, 0]).abs().max() > 1e-4  # position 0 sees position 4


def test_labels_are_ignored_exactly_inside_the_prefix():
    tokens = np.arange(10, 21)  # n = 10 inputs
    for p in (0, 1, 4, 10):
        x, y = prefix_lm_example(tokens, p)
        assert x.tolist() == list(range(10, 20))
        kept = [i for i in range(10) if y[i] != IGNORE_INDEX]
        assert kept == list(range(max(p - 1, 0), 10))  # label i = t[i + 1] kept iff i + 1 >= p
        assert all(y[i] == tokens[i + 1] for i in kept)
    with pytest.raises(ValueError, match="prefix length 11 is outside"):
        prefix_lm_example(tokens, 11)


def test_draw_is_uniform_over_the_range_and_seeded_per_sample():
    rng = np.random.default_rng(0)
    draws = [draw_prefix_length(40, rng, 0.25, 0.5) for _ in range(2000)]
    assert min(draws) == 10 and max(draws) == 20 and len(set(draws)) == 11
    counts = np.bincount(draws)[10:]
    assert counts.min() > 2000 / 11 * 0.7
    obj = SampleObjective("prefix", 3, ByteTokenizer(), prefix_min_frac=0.25, prefix_max_frac=0.5)
    tokens = np.arange(41)
    kw = obj.batch_kwargs([5, 6, 5], 40)["prefix_lengths"]
    assert kw[0] == kw[2] and all(10 <= p <= 20 for p in kw)
    for k, p in zip((5, 6), kw[:2], strict=True):  # the labels agree with the lengths the model gets
        _, y = obj(tokens, k)
        assert (y == IGNORE_INDEX).sum() == max(p - 1, 0)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(prefix_min_frac=-0.1), "objective.prefix_min_frac -0.1 is outside [0, 1]"),
        (dict(prefix_max_frac=1.5), "objective.prefix_max_frac 1.5 is outside [0, 1]"),
        (dict(prefix_min_frac=0.6, prefix_max_frac=0.5), "prefix_min_frac 0.6 exceeds prefix_max_frac 0.5"),
    ],
)
def test_bad_fractions_are_one_line_errors(kw, needle):
    with pytest.raises(ValueError) as e:
        SampleObjective("prefix", 0, ByteTokenizer(), **kw)
    assert needle in str(e.value)


def test_example_recipe_picks_the_prefix_objective_and_its_run_dir(tmp_path, monkeypatch):
    """examples/pretrain_prefix_lm.py: engine.train.main's argv with the objective, and runs/prefix_lm unless the
    flags choose a run directory (the training itself: tests/train/test_objectives_train.py)."""
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("_example_prefix_lm", EXAMPLES / "pretrain_prefix_lm.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    seen = []
    recipe.train_main = seen.append  # the argv engine.train.main would get
    recipe.main(["--data.tokenizer", "byte"])
    recipe.main(["--data.tokenizer", "byte", "--run.dir", "elsewhere", "--objective.prefix_max_frac", "0.5"])
    default, own = (load_config(argv) for argv in seen)
    assert (default.train.objective, default.run.dir) == ("prefix", "runs/prefix_lm")
    assert (own.train.objective, own.run.dir, own.objective.prefix_max_frac) == ("prefix", "elsewhere", 0.5)
