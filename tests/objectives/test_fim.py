"""Fill-in-the-middle: PSM/SPM layouts, round trips to the original text, the FIM and SPM rates, uniform cut points,
context-level FIM over packed samples, bad input."""

import math

import numpy as np
import pytest

from engine.data.tokenizer import ByteTokenizer, train_bpe
from engine.objectives.fim import fim_document, fim_packed, fim_restore

PRE, MID, SUF, EOD, PAD = 1000, 1001, 1002, 1003, 1004  # sentinels of the byte stand-in, beyond any byte
ALPHABET = list("abc xyz\n\t(){}=_é日本🙂")


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def random_text(rng: np.random.Generator, max_len: int = 40) -> str:
    return "".join(rng.choice(ALPHABET, size=int(rng.integers(0, max_len + 1))))


class FixedRng:
    """Stands in for a Generator: given cut points, and a fixed draw for every rng.random() (0 -> transform/SPM)."""

    def __init__(self, cuts: tuple[int, int], u: float):
        self.cuts, self.u = cuts, u

    def integers(self, low, high, size):
        assert (low, size) == (0, 2) and all(0 <= c < high for c in self.cuts)
        return np.array(self.cuts)

    def random(self):
        return self.u


def test_psm_and_spm_layouts():
    text = "ab日c"  # characters: a b 日 c; cut after "ab" and after "日"
    psm = fim_document(text, encode, FixedRng((3, 2), 0.9), 1.0, 0.5, PRE, MID, SUF)
    spm = fim_document(text, encode, FixedRng((2, 3), 0.1), 1.0, 0.5, PRE, MID, SUF)
    assert psm == [PRE, *encode("ab"), SUF, *encode("c"), MID, *encode("日")]
    assert spm == [PRE, SUF, *encode("c"), MID, *encode("ab"), *encode("日")]


@pytest.mark.parametrize("u", [0.1, 0.9], ids=["spm", "psm"])
def test_every_cut_of_a_short_text_round_trips(u):
    text = "é日 x🙂"
    for lo in range(len(text) + 1):  # empty prefix, middle and suffix all occur
        for hi in range(lo, len(text) + 1):
            ids = fim_document(text, encode, FixedRng((hi, lo), u), 1.0, 0.5, PRE, MID, SUF)
            assert ids.count(PRE) == ids.count(MID) == ids.count(SUF) == 1
            assert fim_restore(ids, PRE, MID, SUF, decode) == text, (lo, hi)
    assert (
        fim_restore(fim_document("", encode, FixedRng((0, 0), u), 1.0, 0.5, PRE, MID, SUF), PRE, MID, SUF, decode) == ""
    )


def test_round_trip_many_random_texts():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        text = random_text(rng)
        ids = fim_document(text, encode, rng, 0.7, 0.5, PRE, MID, SUF)
        assert fim_restore(ids, PRE, MID, SUF, decode) == text


@pytest.fixture(scope="module")
def tokenizers():
    corpus = ["def add(a, b):\n    return a + b\n", "naïve café — 日本語 🙂", "the cat sat on the mat " * 5] * 4
    return [ByteTokenizer(), train_bpe(corpus, vocab_size=400)]


def test_round_trip_with_the_engine_tokenizers(tokenizers):
    rng = np.random.default_rng(1)
    texts = [random_text(rng, 60) for _ in range(300)] + ["<|fim_prefix|> literal sentinels <|fim_middle|>", ""]
    for tok in tokenizers:
        ids_of = (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id)
        for text in texts:
            ids = fim_document(text, tok.encode, rng, 1.0, 0.5, *ids_of)
            assert sum(i in ids_of for i in ids) == 3  # text never encodes to a sentinel
            assert fim_restore(ids, *ids_of, tok.decode) == text


def test_fim_and_spm_rates_within_3_sigma():
    rng = np.random.default_rng(2)
    n, fim_rate, spm_rate, length = 6000, 0.3, 0.4, 20
    text = "abcdefghijklmnopqrst"
    outs = [fim_document(text, encode, rng, fim_rate, spm_rate, PRE, MID, SUF) for _ in range(n)]
    fim = [o for o in outs if o[0] == PRE]
    assert abs(len(fim) - n * fim_rate) < 3 * math.sqrt(n * fim_rate * (1 - fim_rate))
    assert all(o == encode(text) for o in outs if o[0] != PRE)
    # <PRE><SUF> leads in SPM and in PSM with an empty prefix (the smaller cut is 0), which read the same.
    p = spm_rate + (1 - spm_rate) * (1 - (length / (length + 1)) ** 2)
    lead = sum(o[1] == SUF for o in fim)
    assert abs(lead - len(fim) * p) < 3 * math.sqrt(len(fim) * p * (1 - p))


def test_cut_points_uniform_over_characters():
    rng = np.random.default_rng(3)
    text, n = "0123456789", 11000  # 11 cut positions; the sorted pair is 2/121 off the diagonal, 1/121 on it
    counts = np.zeros((11, 11))
    for _ in range(n):
        ids = fim_document(text, encode, rng, 1.0, 0.0, PRE, MID, SUF)
        lo = ids.index(SUF) - 1
        counts[lo, lo + len(ids) - ids.index(MID) - 1] += 1
    expected = np.triu(np.full((11, 11), 2.0)) - np.diag(np.ones(11))
    expected = expected / expected.sum() * n
    cells = np.triu(np.ones((11, 11), dtype=bool))
    chi2 = (((counts - expected) ** 2)[cells] / expected[cells]).sum()
    df = cells.sum() - 1
    assert chi2 < df + 6 * math.sqrt(2 * df), chi2


def _packed(rng: np.random.Generator, n_docs: int = 30) -> tuple[np.ndarray, list[str]]:
    docs = [random_text(rng) for _ in range(n_docs)]
    stream = [t for d in docs for t in (*encode(d), EOD)]
    return np.asarray(stream, dtype=np.int32), docs


def test_packed_applies_fim_per_document_and_keeps_the_length():
    rng = np.random.default_rng(4)
    for _ in range(50):
        stream, docs = _packed(rng)
        start = int(rng.integers(0, 20))
        sample = stream[start : start + 300]
        out = fim_packed(sample, EOD, decode, encode, rng, 1.0, 0.5, PRE, MID, SUF, PAD)
        assert out.shape == sample.shape and out.dtype == sample.dtype
        pieces_in = np.split(sample, np.flatnonzero(sample == EOD))
        pieces_out = np.split(out, np.flatnonzero(out == EOD))
        # Every piece the cut at the end left whole restores to the input's piece (EODs kept, in order).
        for a, b in zip(pieces_in[:-1], pieces_out[:-1]):
            a, b = a[a != EOD].tolist(), b[b != EOD].tolist()
            assert fim_restore(b, PRE, MID, SUF, decode) == decode(a)
            # At fim_rate 1 every non-empty piece is transformed, bar a fragment cut inside a character.
            assert (bool(b) and b[0] == PRE) == (bool(a) and "\ufffd" not in decode(a))
        assert (out == PAD).sum() == 0  # byte pieces only grow, so the end is cut, never padded


def test_packed_at_rate_zero_is_the_identity():
    rng = np.random.default_rng(5)
    stream, _ = _packed(rng)
    assert np.array_equal(fim_packed(stream, EOD, decode, encode, rng, 0.0, 0.5, PRE, MID, SUF, PAD), stream)


def test_packed_keeps_fragments_cut_inside_a_character_and_cuts_the_end():
    rng = np.random.default_rng(6)
    broken = np.asarray([*encode("🙂")[:2], EOD, EOD, *encode("日本語")[1:]])  # both pieces decode to U+FFFD
    assert np.array_equal(fim_packed(broken, EOD, decode, encode, rng, 1.0, 0.5, PRE, MID, SUF, PAD), broken)
    head = encode("日本語")[1:]
    sample = np.asarray([*head, EOD, *encode("ok"), EOD, EOD, *encode("🙂")[:2]])
    out = fim_packed(sample, EOD, decode, encode, rng, 1.0, 0.5, PRE, MID, SUF, PAD).tolist()
    n = len(head)  # the fragment stays, "ok" gains 3 sentinels, so the sample is cut after its EOD
    assert out[:n] == head and out[n] == EOD and out[n + 6] == EOD and len(out) == n + 7
    assert out[n + 1] == PRE and fim_restore(out[n + 1 : n + 6], PRE, MID, SUF, decode) == "ok"


def merge_encode(text: str) -> list[int]:
    """A stand-in BPE: "ab" is one token (300), every other character its code point."""
    out, i = [], 0
    while i < len(text):
        pair = text.startswith("ab", i)
        out.append(300 if pair else ord(text[i]))
        i += 2 if pair else 1
    return out


def merge_decode(ids) -> str:
    return "".join("ab" if i == 300 else chr(i) for i in ids)


def test_packed_pads_when_re_encoding_is_shorter():
    sample = np.asarray([ord(c) for c in "ab" * 20], dtype=np.int64)  # one character per token: re-encodes shorter
    out = fim_packed(sample, EOD, merge_decode, merge_encode, np.random.default_rng(7), 1.0, 0.0, PRE, MID, SUF, PAD)
    assert out.shape == sample.shape and out.dtype == sample.dtype and out[-1] == PAD
    body = out[out != PAD].tolist()
    assert fim_restore(body, PRE, MID, SUF, merge_decode) == "ab" * 20


def test_restore_of_plain_and_malformed_ids():
    assert fim_restore(encode("plain"), PRE, MID, SUF, decode) == "plain"
    assert fim_restore([], PRE, MID, SUF, decode) == ""
    with pytest.raises(ValueError, match="lack a suffix"):
        fim_restore([PRE, *encode("x"), MID, SUF], PRE, MID, SUF, decode)


@pytest.mark.parametrize("rates", [(1.5, 0.5), (-0.1, 0.5), (0.5, 2.0), (0.5, float("nan"))])
def test_rates_outside_0_1_fail_in_one_line(rates):
    rng = np.random.default_rng(0)
    for call in (
        lambda: fim_document("x", encode, rng, *rates, PRE, MID, SUF),
        lambda: fim_packed(np.arange(4), EOD, decode, encode, rng, *rates, PRE, MID, SUF, PAD),
    ):
        with pytest.raises(ValueError, match=r"is outside \[0, 1\]") as e:
            call()
        assert "\n" not in str(e.value)


def test_packed_takes_one_sample():
    with pytest.raises(ValueError, match="shape"):
        fim_packed(
            np.zeros((2, 4), dtype=np.int64),
            EOD,
            decode,
            encode,
            np.random.default_rng(0),
            0.5,
            0.5,
            PRE,
            MID,
            SUF,
            PAD,
        )
