"""Builds the optimizer named by OptimConfig over a model, with weight-decay parameter groups.

Weight decay applies to matmul weights only: norm gains, biases (any parameter with ndim < 2) and embedding tables
are excluded by default (nanoGPT, Megatron `no_weight_decay_cond`). An embedding is a parameter owned by a module
whose class name ends in "Embedding" (nn.Embedding, and the vocab-parallel embedding later); a tied output head
shares that tensor and so is not decayed either.

AdamW implementations (`optim.impl`): "torch" = torch.optim.AdamW (foreach); "fused" = torch.optim.AdamW(fused=True)
(an error where the parameters' device has no fused kernel); "apex" = apex.optimizers.FusedAdam(adam_w_mode=True),
a one-line ConfigError unless `apex.optimizers.FusedAdam` imports (NVIDIA apex is detected by that class, not by the
package name: the `apex` on the public index is an unrelated project); "auto" = fused when every parameter's device
has the fused kernel, else torch. "auto" never takes apex: torch's fused AdamW is also one multi-tensor CUDA kernel,
and apex has not been measured against it here (no GPU yet); ask for apex explicitly.
Adafactor (engine.optim.adafactor) takes lr and weight_decay from the config; beta1/beta2/eps are Adam's and
do not apply to it (it uses β̂2_t = 1 − t^−0.8, ε = (1e-30, 1e-3), no momentum, as the paper).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ConfigError, OptimConfig
from engine.optim.adafactor import Adafactor


def _is_embedding(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Embedding")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """[{params: decayed, weight_decay}, {params: not decayed, weight_decay: 0}], each parameter once, model order.

    Each group also carries `names` (the parameters' qualified names) for logging and checkpoint mapping.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if _is_embedding(module) and not decay_embeddings:
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
        # A tied embedding's copy held apart from the embedding (a last pipeline stage's output weight) is the
        # embedding too: decayed like its other copy, or the two would drift apart.
        for alias, canonical in getattr(module, "tied_aliases", {}).items():
            if not decay_embeddings and canonical.startswith("tok_emb") and getattr(module, "tok_emb", 0) is None:
                try:
                    no_decay_ids.add(id(module.get_parameter(alias)))
                except AttributeError:  # this chunk holds neither copy
                    pass
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in no_decay_ids:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def _fused_supported(params: list[torch.Tensor]) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in supported and p.dtype.is_floating_point for p in params)


def _apex_fused_adam():
    """NVIDIA apex's `apex.optimizers.FusedAdam`, or None when it cannot be imported.

    Detected by the class actually used, never by the package name: the package called `apex` on the public index
    is an unrelated project, and a half-built NVIDIA apex can fail at import with other errors than ImportError
    (OSError for a missing shared library, AttributeError, RuntimeError), so any exception means "not available".
    """
    try:
        from apex.optimizers import FusedAdam
    except Exception:  # noqa: BLE001 - any import failure means apex's optimizers are not usable here
        return None
    return FusedAdam


def build_optimizer(model: nn.Module, cfg: OptimConfig, decay_embeddings: bool = False) -> torch.optim.Optimizer:
    """The optimizer for `model` per `cfg` (name, lr, betas, eps, weight_decay, impl); see the module docstring.
    (A training run takes engine.optim.distributed.build_training_optimizer: ZeRO-1's when it applies.)"""
    groups = param_groups(model, cfg.weight_decay, decay_embeddings)
    return optimizer_for_groups([g for g in groups if g["params"]], cfg)


def optimizer_for_groups(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer per `cfg` over given parameter groups (ZeRO-1 passes each rank's shards of the model's)."""
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    if not cfg.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.name == "adafactor":
        return Adafactor(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name != "adamw":
        raise ConfigError(f"optim.name must be adamw or adafactor, got '{cfg.name}'")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(f"optim.{key} must be in [0, 1), got {getattr(cfg, key)}")
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    impl = cfg.impl
    if impl == "apex":
        fused_adam = _apex_fused_adam()
        if fused_adam is None:
            raise ConfigError(
                "optim.impl=apex needs NVIDIA apex with its optimizers (apex.optimizers.FusedAdam did not import); "
                "use auto, torch or fused"
            )
        return fused_adam(groups, adam_w_mode=True, **kw)
    if impl == "fused":
        if not _fused_supported(params):
            devices = sorted({p.device.type for p in params})
            raise ConfigError(f"optim.impl=fused: no fused AdamW kernel for device {','.join(devices)}; use auto")
        return torch.optim.AdamW(groups, fused=True, **kw)
    if impl == "auto":
        return torch.optim.AdamW(groups, fused=_fused_supported(params) or None, **kw)
    if impl == "torch":
        return torch.optim.AdamW(groups, **kw)
    raise ConfigError(f"optim.impl must be auto|torch|fused|apex, got '{impl}'")
