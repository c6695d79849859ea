"""A Hugging Face model directory on disk: `config.json`, the weights as safetensors (one `model.safetensors`, or
shards listed by `model.safetensors.index.json`), and the tokenizer files that travel with them.

The `safetensors` package is imported when a file is read or written (transformers depends on it; `import engine`
does not), with a one-line error naming the package when it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.convert.hf_config import ConvertError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Files a tokenizer and generation defaults are saved as; copied along so the directory stays usable as a whole.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")  # fmt: skip


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ConvertError("reading and writing Hugging Face weights needs the safetensors package "
                           "(pip install safetensors)") from None  # fmt: skip
    return safetensors.torch


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path} is unreadable or not JSON: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return data


def read_config(hf_dir: str | Path) -> dict[str, Any]:
    """The directory's config.json; a missing directory or file is a one-line ConvertError."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise ConvertError(f"Hugging Face model directory {d} does not exist")
    return _read_json(d / "config.json")


def read_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors file(s), by name."""
    d = Path(hf_dir)
    if (d / INDEX).is_file():
        weight_map = _read_json(d / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{d / INDEX} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (d / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        found = sorted(p.name for p in d.glob("*.bin")) if d.is_dir() else []
        hint = f" (found {found[0]}: pickled weights are not read; save them as safetensors)" if found else ""
        raise ConvertError(f"{d} has no {WEIGHTS} or {INDEX}{hint}")
    st = _safetensors()
    out: dict[str, torch.Tensor] = {}
    for name in files:
        path = d / name
        if not path.is_file():
            raise ConvertError(f"safetensors file {path} (listed in {INDEX}) is missing")
        try:
            out.update(st.load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise ConvertError(f"safetensors file {path} is unreadable: {str(e).splitlines()[0][:200]}") from None
    return out


def write_model(hf_dir: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                copy_from: str | Path | None = None) -> Path:  # fmt: skip
    """Writes config.json and model.safetensors into `hf_dir` (created), each under a temporary name renamed into
    place, and copies the tokenizer files of `copy_from` when given."""
    d = Path(hf_dir)
    d.mkdir(parents=True, exist_ok=True)
    st = _safetensors()
    _atomic(d / WEIGHTS, lambda tmp: st.save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic(d / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    if copy_from is not None:
        copy_tokenizer(copy_from, d)
    return d


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer and generation files of `src` that exist into `dst`; returns their names."""
    copied = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    for n in copied:
        shutil.copyfile(Path(src) / n, Path(dst) / n)
    return copied


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
