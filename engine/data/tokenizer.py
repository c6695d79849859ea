"""Tokenizers: a pure byte tokenizer (zero setup), a byte-level BPE trained here with `tokenizers`, any tokenizer.json.

Every tokenizer carries the same reserved special tokens from the start (end of document, pad, mask, begin of
sequence, the four fill-in-the-middle sentinels of Bavarian et al. 2022, 8 spare ids, T5's 100 span-corruption
sentinels `<extra_id_0>`..`<extra_id_99>` and UL2's three mode tokens [NLU] [NLG] [S2S]), because the objectives
(masked LM, FIM, span corruption, UL2) need ids that the data was tokenised around. `SPECIALS_VERSION` names this
set: it enters the cache keys of the trained BPE and of the byte tokenizer, so data tokenised under another set is
rebuilt, never mixed. Text is encoded literally: a string
such as "<|endoftext|>" inside a document encodes as ordinary text, never as the special id, so data cannot forge
document boundaries and decode(encode(text)) == text for any text.
"""

import hashlib
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.data._files import cache_root, file_lock, temp_path

if TYPE_CHECKING:  # imported lazily at run time: `tokenizers` is only needed for BPE and tokenizer.json
    import tokenizers

ROLES = ("eod", "pad", "mask", "bos", "fim_prefix", "fim_middle", "fim_suffix", "fim_pad")
N_RESERVED = 8
N_SENTINELS = 100  # T5's extra ids (Raffel et al. 2020): one per corrupted span
SENTINEL_TOKENS: tuple[str, ...] = tuple(f"<extra_id_{i}>" for i in range(N_SENTINELS))
# UL2's paradigm tokens (Tay et al. 2022, sec. 3.1.2): R-, S- and X-denoising prepend these to the encoder input.
MODE_TOKENS: tuple[str, ...] = ("[NLU]", "[S2S]", "[NLG]")
SPECIALS_VERSION = 2  # 1: roles and spare ids only (16 tokens); 2: + sentinels and mode tokens (119)
# Our names for the roles, in id order; the spare `<|reserved_i|>` ids, the sentinels and the mode tokens follow.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|pad|>",
    "<|mask|>",
    "<|bos|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
) + tuple(f"<|reserved_{i}|>" for i in range(N_RESERVED)) + SENTINEL_TOKENS + MODE_TOKENS
_RESERVED_TOKENS = SPECIAL_TOKENS[len(ROLES) : len(ROLES) + N_RESERVED]
# Names other tokenizer.json files use for the same roles (GPT-2/NeoX, Llama 3, SentencePiece, BERT, StarCoder).
ALIASES = {
    "eod": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>"),
    "mask": ("<|mask|>", "<mask>", "[MASK]"),
    "bos": ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>"),
    "fim_prefix": ("<|fim_prefix|>", "<fim_prefix>", "<fim-prefix>"),
    "fim_middle": ("<|fim_middle|>", "<fim_middle>", "<fim-middle>"),
    "fim_suffix": ("<|fim_suffix|>", "<fim_suffix>", "<fim-suffix>"),
    "fim_pad": ("<|fim_pad|>", "<fim_pad>", "<fim-pad>"),
}


class Tokenizer:
    """Common interface. Subclasses set `name`, `vocab_size`, `special_ids` (role -> id), `reserved_ids` (the spare
    ids), `sentinel_ids` (`<extra_id_0>`.. in order) and `mode_ids` (UL2's mode token -> id)."""

    name: str
    vocab_size: int
    special_ids: dict[str, int]
    reserved_ids: tuple[int, ...]
    sentinel_ids: tuple[int, ...]
    mode_ids: dict[str, int]

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        """Every reserved id: roles, spare ids, sentinels and mode tokens (never produced by encoding text)."""
        return (*self.special_ids.values(), *self.reserved_ids, *self.sentinel_ids, *self.mode_ids.values())

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """Short stable id of the vocabulary and rules: caches of tokenised data are keyed by it."""
        raise NotImplementedError

    eod_id = property(lambda self: self.special_ids["eod"])
    pad_id = property(lambda self: self.special_ids["pad"])
    mask_id = property(lambda self: self.special_ids["mask"])
    bos_id = property(lambda self: self.special_ids["bos"])
    fim_prefix_id = property(lambda self: self.special_ids["fim_prefix"])
    fim_middle_id = property(lambda self: self.special_ids["fim_middle"])
    fim_suffix_id = property(lambda self: self.special_ids["fim_suffix"])
    fim_pad_id = property(lambda self: self.special_ids["fim_pad"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then the 119 special tokens at 256..374 (vocab 375)."""

    def __init__(self) -> None:
        self.name = "byte"
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        ids = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.special_ids = {role: ids[name] for role, name in zip(ROLES, SPECIAL_TOKENS)}
        self.reserved_ids = tuple(ids[name] for name in _RESERVED_TOKENS)
        self.sentinel_ids = tuple(ids[name] for name in SENTINEL_TOKENS)
        self.mode_ids = {name: ids[name] for name in MODE_TOKENS}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if not 256 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range for the byte tokenizer (vocab {self.vocab_size})")
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(SPECIAL_TOKENS[i - 256])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    @property
    def fingerprint(self) -> str:
        return f"byte{SPECIALS_VERSION}"


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (any tokenizer.json). Roles missing from its vocabulary are added as special
    tokens at the end, under our names, so every role has an id; so are the spare ids, sentinels and mode tokens it
    lacks (a T5 tokenizer's own `<extra_id_i>` are its sentinels)."""

    def __init__(self, tok, name: str) -> None:
        self.name = name
        self._tok = tok
        found, missing = {}, []
        for role, ours in zip(ROLES, SPECIAL_TOKENS):
            known = [i for i in (tok.token_to_id(a) for a in ALIASES[role]) if i is not None]
            if known:
                found[role] = known[0]
            else:
                missing.append(ours)
        missing += [t for t in SPECIAL_TOKENS[len(ROLES) :] if tok.token_to_id(t) is None]
        if missing:
            from tokenizers import AddedToken

            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.special_ids = {
            role: found[role] if role in found else tok.token_to_id(ours) for role, ours in zip(ROLES, SPECIAL_TOKENS)
        }
        self.reserved_ids = tuple(tok.token_to_id(t) for t in _RESERVED_TOKENS)
        self.sentinel_ids = tuple(tok.token_to_id(t) for t in SENTINEL_TOKENS)
        self.mode_ids = {t: tok.token_to_id(t) for t in MODE_TOKENS}
        # Special-token strings inside text encode as text (see the module docstring).
        tok.encode_special_tokens = True
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._fast = hasattr(tok, "encode_batch_fast")
        self._fingerprint: str | None = None

    @property
    def backend(self) -> "tokenizers.Tokenizer":
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if self._fast:  # no offset tracking: faster, same ids
            return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str) -> None:
        """Writes tokenizer.json atomically (with the added special tokens)."""
        tmp = temp_path(path)
        try:
            self._tok.save(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def to_str(self) -> str:
        return self._tok.to_str()

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # serialising a large vocabulary takes a while: once per instance
            self._fingerprint = "hf-" + hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:12]
        return self._fingerprint

    def __getstate__(self) -> dict:
        return {"name": self.name, "json": self._tok.to_str()}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer as _Tok

        self.__init__(_Tok.from_str(state["json"]), state["name"])


def train_bpe(texts: Sequence[str], vocab_size: int = 4096, min_frequency: int = 2, name: str = "bpe") -> HFTokenizer:
    """Byte-level BPE (GPT-2 style: bytes mapped to printable symbols, GPT-2 pre-tokenisation regex) trained with
    `tokenizers`. Special tokens take ids 0..118, the 256 byte symbols follow, then the merges. Deterministic."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise ValueError(f"bpe vocab size {vocab_size} is too small: the specials and 256 bytes alone need {floor}")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return HFTokenizer(tok, name)


def load_tokenizer_json(path: str) -> HFTokenizer:
    """Loads any tokenizer.json (a file, or a directory holding one)."""
    from tokenizers import Tokenizer as _Tok

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        json.loads(text)
        tok = _Tok.from_str(text)
    except Exception as e:  # json's ValueError, or the bare Exception tokenizers raises on schema errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a valid tokenizer.json ({first})") from None
    return HFTokenizer(tok, os.path.abspath(path))


def bpe_path(cache_dir: str | None = None, bpe_vocab: int = 4096) -> str:
    """Where the BPE trained on the embedded corpus is cached (keyed by vocab size, the special-token set and the
    corpus fingerprint)."""
    from engine.data.corpus import corpus_key

    key = f"bpe{bpe_vocab}-specials{SPECIALS_VERSION}-{corpus_key()}"
    return os.path.join(cache_root(cache_dir), "tokenizers", key, "tokenizer.json")


def load_tokenizer(spec: str | Tokenizer = "bpe", cache_dir: str | None = None, bpe_vocab: int = 4096) -> Tokenizer:
    """`"byte"`, `"bpe"` (trained on the embedded corpus's train split on first use, then cached; a file lock lets
    concurrent callers wait for one trainer), a path to a tokenizer.json, or a `Tokenizer` (returned as is)."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        path = bpe_path(cache_dir, bpe_vocab)
        if not os.path.isfile(path):
            with file_lock(path + ".lock"):
                if not os.path.isfile(path):
                    from engine.data.corpus import documents

                    tok = train_bpe([d.text for d in documents("train")], bpe_vocab, name=f"bpe{bpe_vocab}")
                    tok.save(path)
        tok = load_tokenizer_json(path)
        tok.name = f"bpe{bpe_vocab}"
        return tok
    if os.path.exists(spec):
        return load_tokenizer_json(spec)
    raise FileNotFoundError(f"tokenizer {spec!r}: not 'byte', 'bpe', or an existing tokenizer.json path")
