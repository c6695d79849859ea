"""Small synthetic corpora for the curation tests: prose that passes every quality filter, written to files."""

import gzip
import json
import random
import string


def prose(seed: int, sentences: int = 8) -> str:
    """A document every filter keeps: sentences of random words around stop words, one sentence per line."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9)))

    lines = [
        f"The {word()} of {word()} and {word()} {word()} with {word()} {word()} to {word()} {word()}."
        for _ in range(sentences)
    ]
    return "\n".join(lines)


def write_jsonl(path, docs: list[dict]) -> str:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    return str(path)


def read_jsonl(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
