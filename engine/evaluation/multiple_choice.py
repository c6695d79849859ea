"""Zero/few-shot multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness's `multiple_choice` tasks.

A task file holds JSON lines `{"context": str, "choices": [str, ...], "answer": int}`. Each choice is the request
(few-shot prefix + context, delimiter + choice) of lm-evaluation-harness (target_delimiter " "), scored by the
sum of the log-probabilities of the continuation's tokens. `acc` is right when the correct choice has the largest
sum; `acc_norm` divides each sum by the choice's length in characters first (lm-eval's length normalisation, which
removes the bias towards short answers). K-shot examples are K other lines of the same file, drawn by a generator
seeded with (seed, line index): the same prompt on every run and in any order of evaluation, never the scored line;
each is written context + delimiter + its correct choice, and they are joined by a blank line ("\n\n").

Tokenisation follows lm-eval's `loglikelihood`: whitespace at the end of the context moves to the continuation,
the continuation's tokens are those of encode(context + continuation) past encode(context), an empty context is
replaced by the EOD token, and a request longer than the model's seq_len + 1 is cut on the left.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FEWSHOT_DELIMITER = "\n\n"


class TaskError(ValueError):
    """A malformed task file or a request the model cannot score; one line naming the file and line."""


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    answer: int
    line: int  # 1-based line number in its file


@dataclass
class TaskResult:
    task: str
    n: int
    shots: int
    acc: float
    acc_norm: float
    acc_stderr: float | None  # the sample standard error sqrt(p (1 - p) / (n - 1)), as lm-eval's; None: n = 1
    loglikelihoods: list[list[float]] = field(default_factory=list)  # per item, per choice


def read_task(path: str | Path) -> list[Item]:
    """The items of a JSON-lines task file (blank lines skipped); a bad line raises TaskError naming its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                items.append(_parse_item(line, n, path))
    if not items:
        raise TaskError(f"task file {path} holds no items")
    return items


def _parse_item(line: str, n: int, path: Path) -> Item:
    where = f"{path}:{n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected an object with context, choices and answer")
    missing = [k for k in ("context", "choices", "answer") if k not in obj]
    if missing:
        raise TaskError(f"{where}: missing key {missing[0]!r}")
    context, choices, answer = obj["context"], obj["choices"], obj["answer"]
    if not isinstance(context, str):
        raise TaskError(f"{where}: context must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskError(f"{where}: choices must be a list of two or more non-empty strings")
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise TaskError(f"{where}: answer must be an integer index into choices")
    if not 0 <= answer < len(choices):
        raise TaskError(f"{where}: answer {answer} is out of range for {len(choices)} choices")
    return Item(context, tuple(choices), answer, n)


def few_shot_prefix(items: Sequence[Item], index: int, shots: int, seed: int, delimiter: str = " ") -> str:
    """The `shots` solved examples put before item `index`: other items of the file, drawn by a generator seeded
    with (seed, index)."""
    if shots == 0:
        return ""
    if shots > len(items) - 1:
        raise TaskError(f"{shots} shots need {shots + 1} items in the task file, it has {len(items)}")
    rng = random.Random(f"{seed}:{index}")  # str seeds are hashed with SHA-512: stable across runs and platforms
    picks = rng.sample([j for j in range(len(items)) if j != index], shots)
    return "".join(items[j].context + delimiter + items[j].choices[items[j].answer] + FEWSHOT_DELIMITER for j in picks)


def request_tokens(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one request, split as lm-eval splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [tokenizer.eod_id], tokenizer.encode(continuation)
    ctx = tokenizer.encode(context)
    return ctx, tokenizer.encode(context + continuation)[len(ctx) :]


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module, context: list[int], continuations: Sequence[list[int]], device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> list[float]:  # fmt: skip
    """log P(continuation | context) for each continuation, in one right-padded batch (causal attention: the
    padding after a row's last token changes none of its logits). `model(tokens)` gives logits (b, s, vocab);
    `model.cfg.seq_len` bounds the window."""
    seq_len = model.cfg.seq_len
    rows, spans = [], []
    for cont in continuations:
        if not cont:
            raise TaskError("a choice encodes to no tokens after its context")
        if len(cont) > seq_len:
            raise TaskError(f"a choice of {len(cont)} tokens is longer than the model's seq_len {seq_len}")
        seq = (context + cont)[-(seq_len + 1) :]
        rows.append(seq)
        spans.append(len(cont))
    width = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r) - 1] = torch.tensor(r[:-1])
    with autocast():
        logits = model(x.to(device))
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    out = []
    for i, (r, k) in enumerate(zip(rows, spans)):
        positions = torch.arange(len(r) - 1 - k, len(r) - 1)
        targets = torch.tensor(r[len(r) - k :])
        out.append(float(logp[i, positions, targets].double().sum()))
    return out


def score_task(
    model: nn.Module, tokenizer: Any, items: Sequence[Item], shots: int = 0, seed: int = 1234, delimiter: str = " ",
    device: torch.device | str = "cpu", autocast: Callable[[], Any] = contextlib.nullcontext, name: str = "task",
) -> TaskResult:  # fmt: skip
    """acc and acc_norm of `model` on `items` with `shots` examples before each."""
    if shots < 0:
        raise TaskError(f"--shots must be >= 0, got {shots}")
    correct = correct_norm = 0
    lls = []
    for i, item in enumerate(items):
        context = few_shot_prefix(items, i, shots, seed, delimiter) + item.context
        pairs = [request_tokens(tokenizer, context, delimiter + c) for c in item.choices]
        ll = choice_loglikelihoods(model, pairs[0][0], [p[1] for p in pairs], device, autocast)  # one context
        norm = [v / len(c) for v, c in zip(ll, item.choices)]
        correct += max(range(len(ll)), key=ll.__getitem__) == item.answer
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == item.answer
        lls.append(ll)
    n = len(items)
    acc = correct / n
    stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else None
    return TaskResult(name, n, shots, acc, correct_norm / n, stderr, lls)
