"""Task vectors (Hendel, Geva & Globerson 2023, "In-Context Learning Creates Task Vectors", arXiv:2310.15916) on a
toy family of maps over a small vocabulary.

Hendel et al. split in-context learning into A(S) -> theta and f(x; theta): the demonstrations S are compressed
into one vector theta, the residual stream at the last prompt position ("->") of an intermediate layer L, and the
answer comes from running the model on the query alone ("x ->") with theta patched in at that position and layer.
Their procedure, reproduced here:

1. theta(S): run the model on "S, x' ->" (S: 5 demonstrations of one task; x': a dummy query, not the test query)
   and keep the hidden state at the last position after layer L;
2. run the model on "x ->" (no demonstrations), replacing that position's hidden state after layer L by theta, and
   score the argmax of the next-token logits against the task's answer f(x);
3. sweep L, against regular ICL ("S, x ->") and the zero-shot baseline ("x ->", no patching).
They also patch theta of one task into a prompt whose demonstrations show another ("conflicting tasks", §5): a
model that reads its task from theta answers with theta's task.

Tokens: items 0..n-1 (letters for n = 26), then BOS, "->" and ",". A prompt is "BOS x1 -> y1 , ... , xk -> yk ,
xq ->" with distinct x's, every y = f(x) for the prompt's task f. The model is the engine's GPT (llama arch:
rotary positions, so a hidden state carries no absolute position and can move from position 4k+2 to position 2),
trained on every answer of fresh sequences, i.e. on every number of demonstrations 0..k at once. Capturing and
patching use forward hooks on the plain model's blocks: the model holds no probe code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.model.gpt import GPT

TASKS = ("next", "previous", "skip", "copy", "mirror", "swap pairs", "rot-half", "shuffle")


def task_tables(n_items: int, tasks: tuple[str, ...] = TASKS, seed: int = 0) -> torch.Tensor:
    """(len(tasks), n_items) answer tables: row t maps item x to f_t(x). next: x+1, previous: x-1, skip: x+2,
    copy: x, mirror: n-1-x (the "antonym" a <-> z), swap pairs: x xor 1 (a <-> b, c <-> d; n even), rot-half:
    x + n/2 (rot13 for letters), shuffle: a fixed random permutation drawn from `seed` (all mod n)."""
    if n_items < 4 or n_items % 2:
        raise ValueError(f"task_tables needs an even n_items >= 4, got {n_items}")
    x = torch.arange(n_items)
    maps = {
        "next": (x + 1) % n_items, "previous": (x - 1) % n_items, "skip": (x + 2) % n_items, "copy": x,
        "mirror": n_items - 1 - x, "swap pairs": x ^ 1, "rot-half": (x + n_items // 2) % n_items,
        "shuffle": torch.randperm(n_items, generator=torch.Generator().manual_seed(seed)),
    }
    unknown = [t for t in tasks if t not in maps]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown} (known: {', '.join(maps)})" if unknown else "no tasks given")
    return torch.stack([maps[t] for t in tasks])


def special_tokens(n_items: int) -> tuple[int, int, int]:
    """(BOS, "->", ",") ids: the three tokens after the items."""
    return n_items, n_items + 1, n_items + 2


def sample_pairs(
    batch: int, n_pairs: int, tables: torch.Tensor, generator: torch.Generator, tasks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tasks (b,), xs (b, n_pairs), ys (b, n_pairs)): a task per row (uniform unless given) and distinct items
    xs, so a query never repeats a demonstration and cannot be answered by copying."""
    n_tasks, n_items = tables.shape
    if batch < 1 or not 1 <= n_pairs <= n_items:
        raise ValueError(f"sample_pairs needs batch >= 1 and 1 <= n_pairs <= {n_items}, got {batch=} {n_pairs=}")
    if tasks is None:
        tasks = torch.randint(0, n_tasks, (batch,), generator=generator)
    xs = torch.rand(batch, n_items, generator=generator).argsort(1)[:, :n_pairs]
    return tasks, xs, tables[tasks[:, None], xs]


def prompt_tokens(xs: torch.Tensor, ys: torch.Tensor, query: torch.Tensor, n_items: int) -> torch.Tensor:
    """(b, 4k + 3) tokens "BOS x1 -> y1 , ... , xk -> yk , xq ->" from demonstrations xs, ys (b, k), queries (b,)."""
    bos, arrow, comma = special_tokens(n_items)
    b, k = xs.shape
    demos = torch.stack((xs, torch.full_like(xs, arrow), ys, torch.full_like(xs, comma)), 2).reshape(b, 4 * k)
    return torch.cat((torch.full((b, 1), bos), demos, query[:, None], torch.full((b, 1), arrow)), 1)


def training_batch(xs: torch.Tensor, ys: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for next-token training on k pairs: the prompt of the first k-1 as demonstrations and the
    last as query; the target at every "->" is its answer (-100 elsewhere), so each sequence trains 0..k-1 shots."""
    inputs = prompt_tokens(xs[:, :-1], ys[:, :-1], xs[:, -1], n_items)
    targets = torch.full_like(inputs, -100)
    targets[:, 2::4] = ys  # the arrows sit at 2, 6, 10, ...
    return inputs, targets


@dataclasses.dataclass
class TaskVectorTraining:
    """One run. `tvp_layer` > 0 adds Yang et al. 2025's task-vector prompting loss at that layer (see
    `train_task_icl`); 0 trains on next-token prediction alone, as Hendel et al.'s pretrained models were."""

    n_items: int = 16
    tasks: tuple[str, ...] = TASKS
    n_pairs: int = 8  # per training sequence: 0..n_pairs-1 demonstrations before each answer
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    steps: int = 500
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 50
    tvp_layer: int = 0
    tvp_weight: float = 1.0
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            arch="llama", n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
            vocab_size=self.n_items + 3, seq_len=4 * self.n_pairs - 1, kernels="torch", tie_embeddings=False,
        )


def train_task_icl(run: TaskVectorTraining, log_every: int = 0) -> tuple[GPT, list[dict]]:
    """Adam with linear warmup on fresh sequences each step (a random task per sequence, so a right answer needs
    the task read from the context); returns the model and the per-step log {step, loss, tvp_loss, seconds}.

    With `run.tvp_layer` = L, each step also takes theta = the hidden state after layer L at the sequence's last
    "->" (whose query plays the dummy x'), patches it into "x ->" for an item x outside the sequence and adds
    `tvp_weight` times the cross-entropy of f(x) there (the TVP-loss of Yang et al. 2025, "Task Vectors in
    In-Context Learning: Emergence, Formation, and Benefit", arXiv:2501.09240), training through both passes."""
    if not 1 <= run.n_pairs < run.n_items:
        raise ValueError(f"n_pairs must be in [1, {run.n_items - 1}] (distinct items per sequence), got {run.n_pairs}")
    if not 0 <= run.tvp_layer <= run.n_layers:
        raise ValueError(f"tvp_layer must be in [0, {run.n_layers}] (0: no TVP-loss), got {run.tvp_layer}")
    torch.manual_seed(run.seed)
    gen = torch.Generator().manual_seed(run.seed)
    tables = task_tables(run.n_items, run.tasks, run.seed)
    model = GPT(run.model_config(), seed=run.seed)
    opt = torch.optim.Adam(model.parameters(), lr=run.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(run.warmup, 1)))
    layers = [run.tvp_layer] if run.tvp_layer else []
    log, start = [], time.perf_counter()
    for step in range(run.steps):
        _, xs, ys = sample_pairs(run.batch, run.n_pairs + 1, tables, gen)  # the last pair: the TVP query
        with capturing(model, layers) as states:
            loss = model(*training_batch(xs[:, :-1], ys[:, :-1], run.n_items))
        tvp_loss = torch.zeros(())
        if run.tvp_layer:
            zero_shot = prompt_tokens(xs[:, :0], ys[:, :0], xs[:, -1], run.n_items)
            with patched(model, run.tvp_layer, states[run.tvp_layer]):
                tvp_loss = F.cross_entropy(model(zero_shot)[:, -1], ys[:, -1])
        opt.zero_grad(set_to_none=True)
        (loss + run.tvp_weight * tvp_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        log.append({"step": step, "loss": loss.item(), "tvp_loss": tvp_loss.item(),
                    "seconds": time.perf_counter() - start})
        if log_every and (step % log_every == 0 or step == run.steps - 1):
            print(f"step {step}: loss {loss.item():.4f}, TVP-loss {tvp_loss.item():.4f} ({log[-1]['seconds']:.0f} s)")
    return model, log


def _block(model: GPT, layer: int) -> nn.Module:
    """Block `layer` (1-based): its output is the residual stream "after layer L"."""
    if not 1 <= layer <= len(model.layers):
        raise ValueError(f"layer must be in [1, {len(model.layers)}], got {layer}")
    return model.layers[str(layer - 1)]


@contextlib.contextmanager
def capturing(model: GPT, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every forward pass stores the hidden state after each of `layers` at the last position,
    (b, d), in the yielded dict (with its autograd graph: the task-vector prompting loss trains through it)."""
    states: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            states[layer] = output[:, -1]

        return hook

    handles = [_block(model, L).register_forward_hook(capture(L)) for L in layers]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def last_position_states(model: GPT, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(logits at the last position (b, vocab), {L: hidden state after layer L at the last position (b, d)} for
    every layer L = 1..n_layers), from one forward pass."""
    with capturing(model, list(range(1, len(model.layers) + 1))) as states:
        logits = model(tokens)[:, -1]
    return logits, states


@contextlib.contextmanager
def patched(model: GPT, layer: int, vectors: torch.Tensor, position: int = -1) -> Iterator[None]:
    """Within the block, every forward pass has its hidden state after `layer` at `position` replaced by `vectors`
    (b, d): the residual stream the later layers (and, through attention, later positions) see."""
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, position] = vectors.to(output.dtype)
        return output

    handle = _block(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def patched_logits(model: GPT, tokens: torch.Tensor, layer: int, vectors: torch.Tensor) -> torch.Tensor:
    """(b, vocab): the last position's logits with `vectors` patched in at the last position after `layer`."""
    with patched(model, layer, vectors):
        return model(tokens)[:, -1]


def _accuracy(logits: torch.Tensor, answers: torch.Tensor) -> float:
    return (logits.argmax(-1) == answers).float().mean().item()


@torch.no_grad()
def evaluate_task_vectors(
    model: GPT, tables: torch.Tensor, n_demos: int = 5, queries_per_task: int = 64, seed: int = 1234
) -> dict:
    """Hendel et al.'s comparison on fresh prompts, `queries_per_task` per task, argmax over the whole vocabulary:
    accuracy of regular ICL ("S, x ->"), of the zero-shot baseline ("x ->") and of the task vector by layer (theta
    from "S, x' ->" patched into "x ->"), with the fraction of those answers that are the dummy query's f(x')
    instead (theta carrying x', not only the task); per task too. `conflict_by_layer`: demonstrations of a task A
    with query x and theta of another task B patched in: the fractions answering f_B(x) and f_A(x) (both count
    where the two maps agree on x)."""
    n_tasks, n_items = tables.shape
    longest = min(n_items - 2, (model.cfg.seq_len - 3) // 4)  # distinct items for S, x' and x; prompt <= seq_len
    if not 1 <= n_demos <= longest:
        raise ValueError(f"n_demos must be in [1, {longest}] for {n_items} items and seq_len {model.cfg.seq_len}, "
                         f"got {n_demos}")
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    task = torch.arange(n_tasks).repeat_interleave(queries_per_task)
    _, xs, ys = sample_pairs(len(task), n_demos + 2, tables, gen, task)  # demos, dummy query x', test query x
    demo_x, demo_y, dummy, query = xs[:, :n_demos], ys[:, :n_demos], xs[:, n_demos], xs[:, n_demos + 1]
    answers, dummy_answers = ys[:, -1], ys[:, n_demos]
    icl_logits = model(prompt_tokens(demo_x, demo_y, query, n_items))[:, -1]
    zero_shot_prompt = prompt_tokens(demo_x[:, :0], demo_y[:, :0], query, n_items)
    zero_logits = model(zero_shot_prompt)[:, -1]
    _, thetas = last_position_states(model, prompt_tokens(demo_x, demo_y, dummy, n_items))
    # Conflicting tasks: the same queries under demonstrations of task A = (B + shift) mod T, theta from task B.
    shift = torch.randint(1, n_tasks, task.shape, generator=gen) if n_tasks > 1 else torch.zeros_like(task)
    other = (task + shift) % n_tasks
    _, ox, oy = sample_pairs(len(task), n_demos + 1, tables, gen, other)
    ox = torch.where(ox == query[:, None], dummy[:, None], ox)  # keep the test query out of the demonstrations
    oy = tables[other[:, None], ox]
    conflict_prompt = prompt_tokens(ox[:, :n_demos], oy[:, :n_demos], query, n_items)
    by_layer, dummy_by_layer, per_task, conflict = [], [], {}, []
    for layer, theta in thetas.items():
        logits = patched_logits(model, zero_shot_prompt, layer, theta)
        by_layer.append(_accuracy(logits, answers))
        dummy_by_layer.append(_accuracy(logits, dummy_answers))
        per_task[layer] = [_accuracy(logits[task == t], answers[task == t]) for t in range(n_tasks)]
        swapped = patched_logits(model, conflict_prompt, layer, theta).argmax(-1)
        conflict.append({"theta_task": (swapped == answers).float().mean().item(),
                         "demonstrations_task": (swapped == tables[other, query]).float().mean().item()})
    best = max(range(len(by_layer)), key=by_layer.__getitem__) + 1
    model.train(was_training)
    return {
        "n_demos": n_demos, "queries": len(task), "icl": _accuracy(icl_logits, answers),
        "zero_shot": _accuracy(zero_logits, answers), "task_vector_by_layer": by_layer, "best_layer": best,
        "task_vector_best": by_layer[best - 1], "dummy_answer_by_layer": dummy_by_layer,
        "icl_per_task": [_accuracy(icl_logits[task == t], answers[task == t]) for t in range(n_tasks)],
        "zero_shot_per_task": [_accuracy(zero_logits[task == t], answers[task == t]) for t in range(n_tasks)],
        "task_vector_per_task_at_best": per_task[best], "conflict_by_layer": conflict,
    }
