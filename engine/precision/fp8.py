"""FP8 linear layers and their scaling recipes: delayed scaling with an amax history (Transformer Engine) and current
(dynamic) scaling (torchao float8), e4m3 in the forward and e5m2 for gradients (TE's HYBRID format).

A linear y = x W^T + b runs its three GEMMs in FP8 with per-tensor scales (kernels/fp8.py):
    forward        y  = q(x) q(W)^T              x, W in e4m3
    input grad     dx = q(dy) q(W^T)^T           dy in e5m2, W^T in e4m3 (the same scale as W)
    weight grad    dW = q(dy^T) q(x^T)^T         dy^T in e5m2, x^T in e4m3 (the same scales as dy and x)
each accumulating in fp32 and applying the two scales after the product.

Scales (`block` aside: fine-grained current scaling, see `_Fp8BlockLinearFunction`). `current`: each tensor's scale
comes from its own amax, measured as it is quantised (one more pass over it).
`delayed`: the scale of step t comes from the history of the amaxes seen at steps before t, max over the window, with
2^margin headroom (scale_inv = max(history) 2^margin / fmt_max); the amax measured now is recorded after use, so no
pass over the tensor precedes its quantisation on a GPU. The first step (an empty history) uses its own amax. A tensor
split across ranks (a tp-sharded weight, a row-parallel input) records the amax of the whole tensor: the local amax
is reduced (MAX) over the group it is split across, so every rank uses the scale one process would.

On CPU the quantisation runs through torch's float8 dtypes (correct rounding) and the GEMMs through the reference
(dequantise, fp32 matmul): an emulation with the recipe's exact numerics, slow but testable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import kernels  # its fp8 module (and triton) load on first use

RECIPES = ("current", "delayed", "block")


@dataclass
class Fp8Recipe:
    """How an Fp8Linear scales its tensors. `history_len` and `margin` apply to delayed scaling."""

    scaling: str = "delayed"
    history_len: int = 16
    margin: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.scaling not in RECIPES:
            raise ValueError(f"fp8 scaling must be one of {', '.join(RECIPES)}, got {self.scaling!r}")
        if self.history_len < 1 or self.margin < 0:
            raise ValueError(f"fp8 amax history length must be >= 1 and margin >= 0, got {self.history_len}, "
                             f"{self.margin}")  # fmt: skip


@dataclass
class AmaxHistory:
    """The amaxes of one tensor over the last `length` steps, newest first (Transformer Engine's amax history).

    `scale_amax(margin)` is what delayed scaling quantises with: max over the window times 2^margin (None while the
    history is empty); `record(amax)` rolls the window by one and stores the newest."""

    length: int
    history: torch.Tensor = field(default=None)  # type: ignore[assignment]
    seen: int = 0

    def __post_init__(self) -> None:
        if self.history is None:
            self.history = torch.zeros(self.length, dtype=torch.float32, device="cpu")  # moves to its amaxes

    def scale_amax(self, margin: int = 0) -> torch.Tensor | None:
        if self.seen == 0:
            return None
        return self.history.max() * (2.0**margin)

    def record(self, amax: torch.Tensor) -> None:
        self.history = torch.roll(self.history.to(amax.device), 1)
        self.history[0] = amax.detach().float().reshape(())
        self.seen = min(self.seen + 1, self.length)

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.seen = state["history"].clone().float(), int(state["seen"])


def global_amax(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """max |x| over the whole tensor, whose pieces `group`'s ranks hold (a MAX all-reduce); a 0-d fp32 tensor."""
    amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def cpu_emulated(backend: str, x: torch.Tensor) -> str:
    """The kernel backend for x: the torch emulation on CPU whatever was asked (the Triton interpreter's fp8 casts
    are wrong), `backend` elsewhere."""
    return "torch" if x.device.type == "cpu" else backend


class Fp8Scaler:
    """The scaling state of one tensor role (input, weight or output gradient) of one layer."""

    def __init__(self, recipe: Fp8Recipe, fmt: str, group: dist.ProcessGroup | None = None):
        self.recipe, self.fmt, self.group = recipe, fmt, group
        self.history = AmaxHistory(recipe.history_len)

    def quantize(self, x: torch.Tensor, record: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp8 data, scale_inv) of x (2-D) by the recipe; with `record`, x's (group-wide) amax joins the history of
        delayed scaling (evaluation forwards do not record: they must not change the training scales)."""
        amax_now = global_amax(x, self.group)
        amax = amax_now
        if self.recipe.scaling == "delayed":
            past = self.history.scale_amax(self.recipe.margin)
            amax = amax_now if past is None else past.to(x.device)
            if record:
                self.history.record(amax_now)
        return kernels.fp8_quantize(x, self.fmt, "tensor", amax=amax, backend=cpu_emulated(self.recipe.backend, x))


class _Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, scalers, record):
        sx_in, sw, sg = scalers
        xq, xs = sx_in.quantize(x2, record)
        wq, ws = sw.quantize(weight, record)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.sg, ctx.backend, ctx.dtype, ctx.wdtype = sg, sw.recipe.backend, x2.dtype, weight.dtype
        return kernels.fp8_matmul(xq, xs, wq, ws, out_dtype=x2.dtype, backend=cpu_emulated(sw.recipe.backend, x2))

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        gq, gs = ctx.sg.quantize(dy.contiguous())
        be = cpu_emulated(ctx.backend, dy)
        # dx = dy W: W^T's rows are W's columns, quantised data transposed (one tensor scale serves both)
        dx = kernels.fp8_matmul(gq, gs, wq.t().contiguous(), ws, out_dtype=ctx.dtype, backend=be)
        # dW = dy^T x
        dw = kernels.fp8_matmul(gq.t().contiguous(), gs, xq.t().contiguous(), xs, out_dtype=torch.float32, backend=be)
        return dx, dw.to(ctx.wdtype), None, None


def fp8_scalers(recipe: Fp8Recipe, group: dist.ProcessGroup | None = None) -> tuple[Fp8Scaler, Fp8Scaler, Fp8Scaler]:
    """The (input, weight, output-gradient) scalers of one linear; `group`: the ranks whose pieces make the whole
    tensors (tensor parallelism: each role's amax is reduced over it; for a replicated tensor that changes nothing)."""
    return Fp8Scaler(recipe, "e4m3", group), Fp8Scaler(recipe, "e4m3", group), Fp8Scaler(recipe, "e5m2", group)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scalers: tuple,
               record: bool) -> torch.Tensor:  # fmt: skip
    """x W^T + b with the three GEMMs in FP8 (module docstring); x (..., in), W (out, in). `record`: delayed scaling
    adds this call's amaxes to the histories (training forwards)."""
    x2, recipe = x.reshape(-1, x.shape[-1]), scalers[0].recipe
    if recipe.scaling == "block":
        y = _Fp8BlockLinearFunction.apply(x2, weight, cpu_emulated(recipe.backend, x2))
    else:
        y = _Fp8LinearFunction.apply(x2, weight, scalers, record)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class _Fp8BlockLinearFunction(torch.autograd.Function):
    """The `block` recipe (DeepSeek-V3, sec. 3.3): current scaling per 1x128 tile of activations and gradients (along
    each GEMM's K dimension, so the backward quantises x^T and dy^T again along the other axis) and per 128x128 block
    of the weight (W^T's blocks are W's, transposed)."""

    @staticmethod
    def forward(ctx, x2, weight, backend):
        q = kernels.fp8_quantize
        xq, xs = q(x2, "e4m3", "tile", backend=backend)
        wq, ws = q(weight, "e4m3", "block2d", backend=backend)
        ctx.save_for_backward(*q(x2.t().contiguous(), "e4m3", "tile", backend=backend), wq, ws)
        ctx.backend, ctx.dtype, ctx.wdtype = backend, x2.dtype, weight.dtype
        return kernels.fp8_matmul(xq, xs, wq, ws, out_dtype=x2.dtype, backend=backend)

    @staticmethod
    def backward(ctx, dy):
        xtq, xts, wq, ws = ctx.saved_tensors
        be, q = ctx.backend, kernels.fp8_quantize
        gq, gs = q(dy.contiguous(), "e5m2", "tile", backend=be)
        gtq, gts = q(dy.t().contiguous(), "e5m2", "tile", backend=be)
        dx = kernels.fp8_matmul(gq, gs, wq.t().contiguous(), ws.t().contiguous(), out_dtype=ctx.dtype, backend=be)
        dw = kernels.fp8_matmul(gtq, gts, xtq, xts, out_dtype=torch.float32, backend=be)
        return dx, dw.to(ctx.wdtype), None


class Fp8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 (module docstring); same parameters and names. `group`: the ranks the
    input and weight are split across (their amaxes are reduced over it); None in one process."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: Fp8Recipe | None = None,
                 group: dist.ProcessGroup | None = None, device=None, dtype=None):  # fmt: skip
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe or Fp8Recipe()
        self.scalers = fp8_scalers(self.recipe, group)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Fp8Recipe | None = None, group=None) -> Fp8Linear:
        """The FP8 form of `linear`, sharing its parameters."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe, group)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.scalers, self.training)

    def fp8_state_dict(self) -> dict:
        """The amax histories (for checkpoints: a resumed run scales exactly as the straight one)."""
        return {name: s.history.state_dict() for name, s in zip(ROLES, self.scalers)}

    def load_fp8_state_dict(self, state: dict) -> None:
        for name, s in zip(ROLES, self.scalers):
            s.history.load_state_dict(state[name])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.recipe.scaling}"


def convert_to_fp8(model: nn.Module, recipe: Fp8Recipe, keep_edges: bool = True) -> int:
    """Swaps the plain nn.Linear layers of `model`'s transformer layers for Fp8Linear (same parameters and names);
    with `keep_edges` the first and last layer of the whole model stay in the training dtype (Transformer Engine's
    advice: they are the most sensitive). Embeddings and the output head are never converted. Returns how many."""
    layers = list(model.layers.items())
    edges = {"0", str(model.cfg.n_layers - 1)} if keep_edges else set()
    n = 0
    for index, block in layers:
        if index in edges:
            continue
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear:
                parent_name, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent_name), child, Fp8Linear.from_linear(module, recipe))
                n += 1
            elif getattr(module, "fp8_capable", False):  # a tensor-parallel linear: amaxes reduced over its tp group
                module.fp8_scalers = fp8_scalers(recipe, module.group)
                n += 1
    return n


ROLES = ("input", "weight", "grad_output")


def _scalers_of(module: nn.Module) -> tuple | None:
    return module.scalers if isinstance(module, Fp8Linear) else getattr(module, "fp8_scalers", None)


def fp8_state(chunks) -> dict:
    """Every FP8 linear's amax histories, by module name (a checkpoint's per-rank object)."""
    return {f"{c}.{name}": {role: s.history.state_dict() for role, s in zip(ROLES, scalers)}
            for c, chunk in enumerate(chunks) for name, m in chunk.named_modules()
            if (scalers := _scalers_of(m)) is not None}  # fmt: skip


def load_fp8_state(chunks, state: dict | None) -> None:
    """Restores `fp8_state`'s histories (a layout or model without them keeps fresh ones)."""
    for c, chunk in enumerate(chunks):
        for name, m in chunk.named_modules():
            if (scalers := _scalers_of(m)) is not None and state and f"{c}.{name}" in state:
                for role, s in zip(ROLES, scalers):
                    s.history.load_state_dict(state[f"{c}.{name}"][role])
