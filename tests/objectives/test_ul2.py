"""Span corruption and UL2 as the trainer's sample transforms (engine/objectives/ul2.py through SampleObjective):
fixed shapes, the de-sentinelled round trip, the decoder inputs, the denoiser rates, the length bookkeeping and bad
input."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from engine.config import load_config
from engine.data.tokenizer import ByteTokenizer
from engine.objectives.mlm import IGNORE_INDEX
from engine.objectives.sample_objective import SampleObjective
from engine.objectives.span_corruption import filled_lengths, restore_spans, t5_lengths
from engine.objectives.ul2 import UL2_DENOISERS, Denoiser, DenoiserMixture, ul2_weights

TOK = ByteTokenizer()


def _window(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n)  # text ids: no special id among them


def _targets(labels):
    """The decoder's targets: the labels up to the padding."""
    return labels[labels != IGNORE_INDEX]


@pytest.mark.parametrize("name", ["span", "ul2"])
def test_samples_have_fixed_shapes_and_rebuild_their_window(name):
    obj = SampleObjective(name, 5, TOK, seq_len=48)
    mix = obj.mixture
    modes = {v: k for k, v in TOK.mode_ids.items()}
    seen = set()
    for index in range(60):
        tokens = _window(obj.window_length, index)
        inputs, labels, kw = obj(tokens, index)
        dec = kw["decoder_inputs"]
        assert inputs.shape == (48,) and labels.shape == dec.shape == (mix.decoder_length,)
        targets = _targets(labels)
        assert (labels[len(targets) :] == IGNORE_INDEX).all() and targets[-1] == TOK.eod_id
        # The decoder reads the targets shifted right behind the start id, padded with the pad id.
        assert dec[0] == TOK.bos_id and (dec[1 : len(targets)] == targets[:-1]).all()
        assert (dec[len(targets) :] == TOK.pad_id).all()
        body = inputs
        if name == "ul2":  # the mode token names the paradigm
            mode = modes[int(inputs[0])]
            seen.add(mode)
            body = inputs[1:]
        if name == "ul2" and mode == "[S2S]":  # the encoder reads a prefix, the decoder continues it
            text = np.concatenate([body[:-1], targets[:-1]])
            assert 1 <= len(targets) - 1 <= 48 // 4
        else:
            assert np.isin(targets[0], TOK.sentinel_ids)
            text = restore_spans(body, targets, TOK.sentinel_ids, TOK.eod_id)
        assert (text == tokens[: len(text)]).all()
        if name == "span":
            assert len(text) == t5_lengths(48)[0]  # T5's raw length at density 0.15, mean span 3
        again = obj(tokens, index)  # each sample from its own seeded generator
        assert (again[1] == labels).all() and (again[0] == inputs).all()
    assert name == "span" or seen == {"[NLU]", "[NLG]", "[S2S]"}


def test_ul2_denoisers_are_drawn_at_their_rates():
    """Over 4000 samples (fixed seed), each paradigm's share (read from the mode token the transform prepends) and
    each denoiser's (from the sample's own generator) lie within 3 sigma of its rate."""
    rates = {"R": 0.5, "X": 0.3, "S": 0.2}
    obj = SampleObjective("ul2", 11, TOK, seq_len=32, ul2_r_rate=0.5, ul2_x_rate=0.3, ul2_s_rate=0.2)
    n, window = 4000, _window(obj.window_length)
    modes = {TOK.mode_ids[t]: p for p, t in (("R", "[NLU]"), ("X", "[NLG]"), ("S", "[S2S]"))}
    paradigms = [modes[int(obj(window, k)[0][0])] for k in range(n)]
    for p, rate in rates.items():
        share = paradigms.count(p) / n
        assert abs(share - rate) < 3 * np.sqrt(rate * (1 - rate) / n), (p, share)
    draws = np.bincount([obj.mixture.draw(np.random.default_rng([11, k])) for k in range(n)], minlength=7)
    for (denoiser, prob), count in zip(ul2_weights(0.5, 0.3, 0.2), draws):
        assert abs(count / n - prob) < 3 * np.sqrt(prob * (1 - prob) / n), (denoiser, count)
    assert [d for d, _ in ul2_weights(1, 1, 1)] == [d for ds in UL2_DENOISERS.values() for d in ds]


def test_filled_lengths_are_t5s_where_t5_needs_no_adjustment():
    assert filled_lengths(512, 0.15, 3.0) == t5_lengths(512) == (568, 114)
    for length in range(64, 2049, 61):
        for density, span in ((0.15, 3.0), (0.15, 8.0), (0.3, 5.0)):
            assert filled_lengths(length, density, span) == t5_lengths(length, density, span), (length, density)
    # At density 0.5 T5 may leave the input one short; ours fills it exactly.
    mix = DenoiserMixture(512, [(Denoiser("X", 8.0, 0.5), 1.0)], range(1000, 1100), 1, 2, 3)
    inputs, _, _ = mix(_window(mix.window_length), np.random.default_rng(0))
    assert len(inputs) == 512


class _NoSentinels:
    special_ids = ByteTokenizer().special_ids
    vocab_size = 300


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(name="ul2", ul2_r_rate=1.5), "objective.ul2_r_rate 1.5 is outside [0, 1]"),
        (dict(name="ul2", ul2_r_rate=0.0, ul2_x_rate=0.0, ul2_s_rate=0.0), "are all 0"),
        (dict(name="span", span_noise_density=1.5), "objective.span_noise_density 1.5 is outside [0, 1]"),
        (dict(name="span", span_mean_length=0.5), "span_mean_length 0.5 >= 1"),
        (dict(name="span", tokenizer=_NoSentinels()), "needs a tokenizer with sentinel ids"),
        (dict(name="ul2", seq_len=1024), "makes 255 spans of model.seq_len 1024 tokens, more than the tokenizer's 100"),
    ],
)
def test_bad_input_is_one_line(kw, needle):
    kw = {"seed": 0, "tokenizer": TOK, "seq_len": 32, **kw}
    with pytest.raises(ValueError) as e:
        SampleObjective(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    obj = SampleObjective("span", 0, TOK, seq_len=32)
    assert obj.window_length == t5_lengths(32)[0]
    with pytest.raises(ValueError, match=f"a denoising window needs {obj.window_length} tokens"):
        obj(_window(obj.window_length - 1), 0)


def test_example_recipe_picks_t5_span_and_its_run_dir(tmp_path, monkeypatch):
    """examples/pretrain_t5.py: engine.train.main's argv with the t5 model and span corruption (ul2 when the flags
    say so), and runs/t5 unless the flags choose a run directory (its training: tests/train/test_objectives_train)."""
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    path = Path(__file__).resolve().parents[2] / "examples" / "pretrain_t5.py"
    spec = importlib.util.spec_from_file_location("_example_t5", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    seen = []
    recipe.train_main = seen.append  # the argv engine.train.main would get
    recipe.main(["--data.tokenizer", "byte"])
    recipe.main(["--run.dir", "elsewhere", "--train.objective", "ul2", "--objective.ul2_s_rate", "0.5"])
    default, own = (load_config(argv) for argv in seen)
    assert (default.model.arch, default.train.objective, default.run.dir) == ("t5", "span", "runs/t5")
    assert (own.model.arch, own.train.objective, own.run.dir) == ("t5", "ul2", "elsewhere")
    assert own.objective.ul2_s_rate == 0.5
