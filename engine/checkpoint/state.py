"""What goes into a checkpoint besides the model: optimizer state keyed by parameter name, and RNG states.

PyTorch's optimizer state_dict keys state by parameter *index*, which breaks as soon as the parameter list or its
order changes (another layout, another grouping). Keying by parameter name, with each entry a plain tensor, is what
lets a later load reshard it like model tensors.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

# Param-group entries that choose an implementation, not the math: a load keeps the live optimizer's.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or for a DTensor (FSDP2's sharded parameters and their optimizer state) the whole tensor: an
    all-gather, so every rank of its mesh calls it in the same order."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def as_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor placed as `like`: for a DTensor, this rank's shard of `value` (no communication), else `value`
    in `like`'s dtype and device."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = value.to(device=like.device, dtype=like.dtype)
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value.to(device=like.device, dtype=like.dtype)


def optimizer_state_to_named(
    optimizer: torch.optim.Optimizer, param_names: dict[int, str], gather: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits `optimizer.state_dict()` into tensors named `optim.<param>.<key>` and JSON-able metadata.

    `param_names` maps `id(param)` to its name in the model. Non-tensor state values (e.g. an int step) and the
    param groups' hyperparameters go into the metadata. With `gather` each tensor is whole and on the CPU (a DTensor
    all-gathered); without, tensors stay as they are (a DTensor keeps its shard, for a sharded save).
    """
    sd = optimizer.state_dict()
    index_to_name = [param_names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        name = index_to_name[idx]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{key}"] = full_tensor(value.detach()).cpu() if gather else value.detach()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = []
    for group in sd["param_groups"]:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [index_to_name[i] for i in group["params"]]
        groups.append(g)
    return tensors, {"param_groups": groups, "scalars": scalars}


def named_to_optimizer_state(
    optimizer: torch.optim.Optimizer,
    param_names: dict[int, str],
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    """Loads what `optimizer_state_to_named` produced into `optimizer` (whose groups may be ordered differently)."""
    name_to_index = {
        param_names[id(p)]: i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])
    }
    state: dict[int, dict[str, Any]] = {}
    for full, value in tensors.items():
        if not full.startswith("optim."):
            continue
        name, _, key = full[len("optim.") :].rpartition(".")
        if name not in name_to_index:
            raise KeyError(f"checkpoint has optimizer state for unknown parameter '{name}'")
        state.setdefault(name_to_index[name], {})[key] = value
    for name, values in meta.get("scalars", {}).items():
        state.setdefault(name_to_index[name], {}).update(values)
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise KeyError(
            f"checkpoint has {len(saved_groups)} optimizer param groups, this optimizer has "
            f"{len(optimizer.param_groups)}"
        )
    groups = []
    for saved, live in zip(saved_groups, optimizer.param_groups):
        live_names = [param_names[id(p)] for p in live["params"]]
        if sorted(saved["params"]) != sorted(live_names):
            raise KeyError("checkpoint optimizer param groups hold different parameters than this optimizer's")
        # The live group's keys with the saved hyperparameters over them: how the update is computed is this run's
        # choice (optim.impl may change on resume), and a key one implementation lacks is not carried to another.
        g = {k: v for k, v in live.items() if k != "params"}
        g.update({k: v for k, v in saved.items() if k in live and k != "params" and k not in IMPLEMENTATION_KEYS})
        g["params"] = [name_to_index[n] for n in live_names]
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for group in optimizer.param_groups:  # DTensor parameters (FSDP2) take their shard of each whole state tensor
        for p in group["params"]:
            if hasattr(p, "device_mesh"):
                st = optimizer.state.get(p, {})
                for key, value in st.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and not hasattr(value, "device_mesh"):
                        st[key] = as_like(value, p)


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.no_grad()
def load_named_parameters(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies a checkpoint's `model` tensors (keyed by parameter name, each shared tensor once) into an unsharded
    model; a missing, unexpected or misshapen tensor is a KeyError naming it."""
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise KeyError(f"checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            shape = tuple(tensors[name].shape)
            raise KeyError(f"checkpoint tensor {name} has shape {shape}, the model's {tuple(p.shape)}")
        p.copy_(tensors[name])
