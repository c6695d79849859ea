"""The embedded default corpus: text and code that ship with the Python interpreter itself (no download).

Code: the standard library's `.py` files, minus test suites, IDLE, lib2to3, distutils, codec tables, installed
packages and files over 100 KB (generated tables, giant modules), capped at 8 MB in sorted order.
Prose: the English help topics of `pydoc_data.topics` (the text behind `help("FOR")`).
About 7 MB / 500 documents, enough for a tiny GPT and small enough that training a 4096-token BPE and tokenising
it all takes seconds. Document order is sorted by name; the train/valid split is by a hash of the document name,
so it is the same on every machine with the same Python and never mixes one document into both splits.
"""

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass

# Bump when the selection or the split changes: caches are keyed by it.
CORPUS_VERSION = 2
VALID_PERCENT = 5
MAX_FILE_BYTES = 100_000
MAX_CODE_BYTES = 8_000_000
SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "distutils",
        "encodings",
        "ensurepip",
        "turtledemo",
        "pydoc_data",
        "site-packages",
        "dist-packages",
        "__pycache__",
    }
)
SPLITS = ("train", "valid", "all")


@dataclass(frozen=True)
class Document:
    name: str  # "code/json/decoder.py" or "prose/pydoc/for"
    text: str


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _code_files() -> list[tuple[str, str, int]]:
    """(name, path, size) of the selected standard-library sources, sorted by name."""
    root = stdlib_dir()
    found = []
    for d, dirs, files in os.walk(root):
        # config-3.x-<platform> holds the build's Makefile and generated sysconfig data, not library code.
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("config-"))
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                size = os.path.getsize(path)
                if 0 < size <= MAX_FILE_BYTES:
                    found.append(("code/" + os.path.relpath(path, root).replace(os.sep, "/"), path, size))
    found.sort()
    selected, total = [], 0
    for item in found:
        if total + item[2] > MAX_CODE_BYTES:
            break
        selected.append(item)
        total += item[2]
    return selected


def split_of(name: str) -> str:
    """'valid' for about VALID_PERCENT % of document names (by hash), else 'train'."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return "valid" if h % 100 < VALID_PERCENT else "train"


def documents(split: str = "all") -> list[Document]:
    """The embedded corpus (or one split of it), sorted by document name."""
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r} (choose from {', '.join(SPLITS)})")
    from pydoc_data.topics import topics

    docs = [Document(f"prose/pydoc/{k}", topics[k]) for k in sorted(topics) if topics[k].strip()]
    for name, path, _ in _code_files():
        try:
            with open(path, encoding="utf-8") as f:
                docs.append(Document(name, f.read()))
        except UnicodeDecodeError:
            continue  # a stdlib file in another encoding: rare, skipped the same way everywhere
    docs.sort(key=lambda d: d.name)
    if split != "all":
        docs = [d for d in docs if split_of(d.name) == split]
    return docs


def corpus_key() -> str:
    """A short fingerprint of the corpus on this interpreter (cheap: file names and sizes, no reads), for caches."""
    import pydoc_data.topics

    h = hashlib.sha256(f"v{CORPUS_VERSION}|{sys.version_info[:3]}|{sys.implementation.name}".encode())
    h.update(str(os.path.getsize(pydoc_data.topics.__file__)).encode())
    for name, _, size in _code_files():
        h.update(f"|{name}:{size}".encode())
    return f"corpus{CORPUS_VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}-{h.hexdigest()[:10]}"
