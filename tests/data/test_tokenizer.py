"""Tokenizers: reserved special ids, exact round trips, the cached BPE, loading any tokenizer.json, bad files."""

import os
import pickle
import time

import pytest

from engine.data.tokenizer import (
    MODE_TOKENS,
    ROLES,
    SENTINEL_TOKENS,
    SPECIAL_TOKENS,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    load_tokenizer_json,
    train_bpe,
)

CODE = 'def add(a, b):\n    """Return a + b."""\n    return a + b  # simple\n\n\nclass Foo:\n    x = [1, 2, 3]\n'
PROSE = "The assert statement is a convenient way to insert debugging assertions into a program."
UNICODE = "naïve café — 日本語 🙂 \t\r\n"
TEXTS = [CODE, PROSE, "", " ", "x", "a  b\n\n\tc", UNICODE, "<|endoftext|> and <|mask|> as plain text"]


def _check_specials(tok: Tokenizer, our_names: bool = True) -> None:
    ids = [getattr(tok, f"{role}_id") for role in ROLES] + list(tok.reserved_ids)
    ids += [*tok.sentinel_ids, *tok.mode_ids.values()]
    assert len(set(ids)) == len(SPECIAL_TOKENS) == 8 + 8 + 100 + 3, ids
    assert sorted(tok.all_special_ids) == sorted(ids)
    assert all(0 <= i < tok.vocab_size for i in ids)
    for role, name in zip(ROLES, SPECIAL_TOKENS) if our_names else []:
        assert tok.decode([getattr(tok, f"{role}_id")]) == name
    # T5's sentinels in order and UL2's mode tokens, under their names
    assert [tok.decode([i]) for i in tok.sentinel_ids] == list(SENTINEL_TOKENS)
    assert [tok.decode([tok.mode_ids[m]]) for m in MODE_TOKENS] == list(MODE_TOKENS)


def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 375
    assert (tok.eod_id, tok.pad_id, tok.mask_id, tok.bos_id) == (256, 257, 258, 259)
    assert (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.fim_pad_id) == (260, 261, 262, 263)
    assert tok.sentinel_ids == tuple(range(272, 372)) and tok.mode_ids == {"[NLU]": 372, "[S2S]": 373, "[NLG]": 374}
    _check_specials(tok)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode()) and tok.decode(ids) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.decode(tok.encode("ab") + [tok.eod_id] + tok.encode("é")) == "ab<|endoftext|>é"
    with pytest.raises(ValueError, match="token id 375 out of range"):
        tok.decode([375])


def test_bpe_specials_round_trip_and_cache(bpe_tokenizer, engine_cache):
    tok = bpe_tokenizer
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 4096 and tok.name == "bpe4096"
    # Specials are the first ids, in a fixed order: stable across trainings and corpora.
    assert [getattr(tok, f"{r}_id") for r in ROLES] == list(range(8)) and tok.reserved_ids == tuple(range(8, 16))
    assert tok.sentinel_ids == tuple(range(16, 116)) and sorted(tok.mode_ids.values()) == [116, 117, 118]
    _check_specials(tok)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    # Special strings in text are text, never the special ids (data cannot forge document boundaries).
    assert not set(tok.encode(TEXTS[-1])) & set(range(len(SPECIAL_TOKENS)))
    assert not set(tok.encode("<extra_id_0> [NLU] [S2S] [NLG]")) & set(tok.all_special_ids)
    # It learned the corpus: Python code compresses well below one token per 2 bytes.
    assert len(tok.encode(CODE)) < len(CODE.encode()) / 2
    # The second load comes from the cache (no retraining) and is the same tokenizer.
    t0 = time.perf_counter()
    again = load_tokenizer("bpe", cache_dir=engine_cache, bpe_vocab=4096)
    assert time.perf_counter() - t0 < 2.0
    assert again.fingerprint == tok.fingerprint and again.encode(CODE) == tok.encode(CODE)


def test_bpe_training_is_deterministic_and_checks_vocab():
    texts = [CODE, PROSE, UNICODE] * 3
    a, b = train_bpe(texts, 400), train_bpe(texts, 400)
    assert a.to_str() == b.to_str() and a.fingerprint == b.fingerprint
    assert a.decode(a.encode(UNICODE + CODE)) == UNICODE + CODE
    with pytest.raises(ValueError, match="too small"):
        train_bpe(texts, 370)


def test_save_and_load_tokenizer_json(tmp_path):
    tok = train_bpe([CODE, PROSE], 400)
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    for spec in (path, str(tmp_path)):  # a file or a directory holding tokenizer.json
        loaded = load_tokenizer(spec)
        assert loaded.special_ids == tok.special_ids and loaded.reserved_ids == tok.reserved_ids
        assert loaded.sentinel_ids == tok.sentinel_ids and loaded.mode_ids == tok.mode_ids
        assert loaded.encode(CODE) == tok.encode(CODE) and loaded.vocab_size == tok.vocab_size
    assert os.listdir(tmp_path) == ["tokenizer.json"]


def test_foreign_tokenizer_json_gets_missing_roles(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "hello": 3, "world": 4, "[UNK]": 5}
    hf = HFTok(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "foreign.json")
    hf.save(path)
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eod_id, tok.pad_id) == (0, 1, 2)  # existing names are reused for their roles
    assert tok.mask_id >= 6 and tok.fim_prefix_id >= 6  # missing roles are appended after the vocabulary
    assert tok.vocab_size == 6 + 5 + 8 + 100 + 3  # mask, 4 FIM tokens, 8 reserved, sentinels, modes were added
    _check_specials(tok, our_names=False)
    assert tok.decode([tok.mask_id]) == "<|mask|>" and tok.decode([tok.eod_id]) == "</s>"
    assert tok.encode("hello world") == [3, 4]


def test_pickle_hf_tokenizer():
    tok = train_bpe([CODE, PROSE], 400)
    back = pickle.loads(pickle.dumps(tok))
    assert back.encode(CODE) == tok.encode(CODE) and back.special_ids == tok.special_ids


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not 'byte', 'bpe', or an existing tokenizer.json"):
        load_tokenizer("nonexistent-tokenizer")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError) as e:
        load_tokenizer(str(bad))
    assert str(bad) in str(e.value) and "not a valid tokenizer.json" in str(e.value) and "\n" not in str(e.value)
    bad.write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer_json(str(bad))
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer_json(str(tmp_path / "missing"))


def test_the_special_token_set_enters_the_cache_keys(tmp_path, monkeypatch):
    """Data tokenised before the sentinels existed is never reused: the byte tokenizer's fingerprint (the embedded
    corpus's directory) and the cached BPE's path both name the special-token set."""
    from engine.data import tokenizer as tk
    from engine.data.embedded import prepare_embedded

    byte_key, bpe_key = ByteTokenizer().fingerprint, tk.bpe_path(str(tmp_path))
    assert byte_key == "byte2" and "specials2" in bpe_key
    data = prepare_embedded(str(tmp_path), tokenizer="byte")
    assert os.path.basename(data.directory).startswith("byte2-")
    assert data.meta["vocab_size"] == 375
    monkeypatch.setattr(tk, "SPECIALS_VERSION", 1)
    assert ByteTokenizer().fingerprint != byte_key and tk.bpe_path(str(tmp_path)) != bpe_key
