"""Per-parameter seeded initialisation: any layout, any build order, the same values.

Each parameter is drawn from its own generator seeded by (seed, its canonical name), so its values never depend on
which other parameters exist on this rank, in what order they are initialised, or how the model is wrapped or split
(docs/contracts.md, "Initialisation"). The canonical name is the fully qualified name with wrapper segments removed
(DDP's leading `module.`, torch.compile's `_orig_mod.`, activation-checkpoint and FSDP wrapper segments); a tied
weight has one name (`tok_emb.weight`), so a copy held elsewhere (a last pipeline stage's output head) gets the same
values.

Distributions (Megatron-LM's; GPT-2 §2.3, Radford et al. 2019): matrices and embeddings N(0, init_std), the output
projections of each residual branch (`o_proj`, `down_proj`) N(0, init_std / sqrt(2 * n_layers)), biases 0, norm gains
1.

A sharded parameter (tensor parallelism) is initialised by drawing its full tensor from the same generator and keeping
this rank's slice: one full parameter is materialised at a time. The sharding is described by any object with
`get(name)` returning None or a spec with `sharded`, `global_shape` and `local_from_full(full)` (the parallel
package's registry); this module needs none of it for a plain model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})

Fill = Callable[[torch.Tensor, torch.Generator], object]


def canonical_name(name: str) -> str:
    """`name` without wrapper segments: leading `module.` (DDP), `_orig_mod.` (torch.compile) and the activation
    checkpoint / FSDP wrapper segments anywhere."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def root_attribute(model: nn.Module, attribute: str):
    """`attribute` recorded in the instance dict of `model` or of the module it wraps (DDP's `.module`,
    torch.compile's `_orig_mod`, nested), or None."""
    for _ in range(8):
        value = model.__dict__.get(attribute)
        if value is not None:
            return value
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return None


def param_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, canonical name); stable across runs, platforms and Python versions."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def unique_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(canonical name, parameter), each tensor once (a tied weight under its first name), in module order."""
    for name, p in model.named_parameters():  # named_parameters already skips repeats of a shared tensor
        yield canonical_name(name), p


def fill_for(name: str, ndim: int, init_std: float, n_layers: int) -> Fill:
    """The distribution of the parameter `name` (canonical) of a GPT with `init_std` and `n_layers`."""
    if ndim >= 2:
        leaf = name.rsplit(".", 2)[-2] if name.count(".") else name
        std = init_std / (2 * n_layers) ** 0.5 if leaf in ("o_proj", "down_proj") else init_std
        return lambda t, g: t.normal_(0.0, std, generator=g)
    if name.endswith("bias"):
        return lambda t, g: t.zero_()
    return lambda t, g: t.fill_(1.0)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, sharding=None) -> None:
    """Initialises every parameter of a GPT-like `model` (with `cfg.init_std`, `cfg.n_layers`) in place, then its
    buffers (`model.init_buffers()` when it has one). `sharding`: the registry of sharded parameters (see module
    docstring), None for a plain model. Parameters must be materialised (not on the meta device)."""
    cfg = model.cfg
    aliases = getattr(model, "tied_aliases", {})
    for name, p in unique_named_parameters(model):
        if p.is_meta:
            raise RuntimeError(f"init_weights: parameter {name} is on the meta device; materialise the model first")
        spec = None if sharding is None else sharding.get(name)  # how this copy is laid out here
        name = aliases.get(name, name)  # whose values it holds: a tied copy seeds by its one name
        fill = fill_for(name, p.ndim, cfg.init_std, cfg.n_layers)
        gen = torch.Generator(device=p.device)
        gen.manual_seed(param_seed(seed, name))
        if spec is None or not spec.sharded:
            fill(p, gen)
        else:
            full = torch.empty(spec.global_shape, dtype=p.dtype, device=p.device)
            fill(full, gen)
            p.copy_(spec.local_from_full(full))
            del full
    if hasattr(model, "init_buffers"):
        model.init_buffers()


def materialize_(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocates a meta-device model's parameters and buffers on `device` (uninitialised: call `init_weights`),
    keeping tied parameters tied (`Module.to_empty` gives each owner of a shared tensor its own copy)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, name))
    model.to_empty(device=device)
    for shared in owners.values():
        first_module, first_name = shared[0]
        for module, name in shared[1:]:
            setattr(module, name, getattr(first_module, first_name))
    return model
