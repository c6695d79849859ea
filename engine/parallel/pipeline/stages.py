"""Splitting the plain model into pipeline stages.

The model's layers are keyed by index in an nn.ModuleDict, so a stage is the model with the layers it does not own
removed: names stay those of the whole model (`layers.7.attn.q_proj.weight` on whichever stage holds layer 7), and
per-name initialisation gives every stage exactly the values the unsplit model has. The first stage keeps the token
embedding (and positions), the last the output head and loss; a tied output weight on the last stage has the
embedding's one name, so it starts equal and its gradient is summed over the embedding group (first and last stage).

Multi-token prediction modules (`mtp`, engine.model.mtp) go to the last stage with the output head they share. For the
sequential kind that stage also keeps the token embedding, as `mtp_emb` placed where `tok_emb` was (so tensor
parallelism converts it before the output head, which may be tied to it): a copy with the embedding's one name, like
a tied output weight.

Balance: layers are spread by count with the embedding and the head each costed as one layer (as torchtitan and
Megatron-LM's "account for embedding/loss in pipeline split" do), and each multi-token prediction module as one more
on the last stage, or split explicitly (`parallel.pp_layers`).
"""

from __future__ import annotations

import copy

from torch import nn

from engine.config import ConfigError


def stage_layer_counts(n_layers: int, n_stages: int, explicit: str = "", last_stage_extra: int = 0) -> list[int]:
    """Layers per global stage. `explicit`: "3,5,5,3" (must sum to n_layers, one number per stage).
    `last_stage_extra`: blocks the last stage runs besides its layers (multi-token prediction modules), each costed
    as one layer."""
    if explicit:
        try:
            counts = [int(x) for x in explicit.split(",")]
        except ValueError:
            raise ConfigError(f"parallel.pp_layers must be comma-separated integers, got '{explicit}'") from None
        if len(counts) != n_stages or sum(counts) != n_layers or min(counts) < 0:
            raise ConfigError(
                f"parallel.pp_layers '{explicit}' must give {n_stages} stages (pp x virtual_stages) non-negative layer "
                f"counts summing to model.n_layers = {n_layers}"
            )
        return counts
    if n_stages > n_layers:
        raise ConfigError(
            f"{n_stages} pipeline stages (parallel.pp x parallel.virtual_stages) need at least as many layers, but "
            f"model.n_layers = {n_layers}"
        )
    units = n_layers + 2 + last_stage_extra  # the embedding and the head cost one layer each
    base, extra = divmod(units, n_stages)
    sizes = [base] * n_stages
    order = list(range(1, n_stages - 1)) + [0, n_stages - 1] if n_stages > 2 else list(range(n_stages))
    for i in order[:extra]:  # spare units to the middle stages first: the ends already carry embedding and head
        sizes[i] += 1
    last = n_stages - 1
    counts = [sizes[i] - (i == 0) - (i == last) * (1 + last_stage_extra) for i in range(n_stages)]
    # An end stage too small for what it carries takes its layer deficit from the stage holding the most layers (the
    # nearest on a tie). While a count is negative another holds at least two (the counts sum to n_layers >=
    # n_stages), so no stage that had a layer is left without one.
    for i in (0, last):
        while counts[i] < 0:
            j = max((j for j in range(n_stages) if j != i), key=lambda j: (counts[j], -abs(j - i)))
            counts[j] -= 1
            counts[i] += 1
    return counts


def stage_layers(n_layers: int, n_stages: int, stage: int, explicit: str = "", last_stage_extra: int = 0) -> range:
    """The layer indices of global stage `stage`."""
    counts = stage_layer_counts(n_layers, n_stages, explicit, last_stage_extra)
    start = sum(counts[:stage])
    return range(start, start + counts[stage])


def _insert_child_after(module: nn.Module, after: str, name: str, child: nn.Module) -> None:
    """Registers `child` as `module.<name>` right after the child slot `after`: modules are visited (and converted
    by a tensor-parallel plan) in registration order."""
    items = list(module._modules.items())
    at = [key for key, _ in items].index(after) + 1
    module._modules = dict(items[:at] + [(name, child)] + items[at:])


def split_model(model: nn.Module, n_stages: int, stage: int, explicit: str = "") -> nn.Module:
    """A copy of the plain GPT `model` (best on the meta device: nothing is allocated) holding only global stage
    `stage`'s part: its layers, the embedding when first, the output head when last (with the multi-token prediction
    modules, and for the sequential kind the embedding's copy `mtp_emb`)."""
    mtp = getattr(model, "mtp", None)
    keep = stage_layers(len(model.layers), n_stages, stage, explicit, len(mtp) if mtp is not None else 0)
    chunk = copy.deepcopy(model)
    for key in list(chunk.layers):
        if int(key) not in keep:
            del chunk.layers[key]
    last = stage == n_stages - 1
    if stage > 0:
        embedding = chunk.tok_emb
        chunk.tok_emb = None
        chunk.pos_emb = None
        if last and "mtp_emb.weight" in getattr(chunk, "tied_aliases", {}):
            _insert_child_after(chunk, "tok_emb", "mtp_emb", embedding)
    if not last:
        chunk.output = None
        if getattr(chunk, "mtp", None) is not None:
            chunk.mtp = None
    return chunk
