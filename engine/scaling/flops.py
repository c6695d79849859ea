"""Training FLOPs accounting: model and hardware FLOPs per token, training FLOPs, MFU and HFU, device peaks.

Model FLOPs per token are `engine.model.gpt.flops_per_token` (PaLM, Chowdhery et al. 2022, App. B):

    6 N_mm + 12 L H Q T

where N_mm = the non-embedding parameters (`count_params(cfg, non_embedding=True)`: every transformer-layer
parameter and the final norm, so the norm gains count as if they were matmul weights, a negligible excess) plus the
output projection V x d (the logits are a real matmul, tied or not); the embedding lookup is a gather, not counted.
L = layers, H = heads, Q = head dim, T = keys each query scores (the sequence, or the sliding window when shorter).
Per token the forward pass costs 2 N_mm (a multiply-accumulate is 2 FLOPs) + 4 L H Q T (QK^T and softmax @ V, each
2 H Q T per layer and token, counted over all T keys, as PaLM and Megatron do, not halved for the causal mask), and
the backward pass twice the forward (gradients with respect to the inputs and to the weights): 3 x forward.
Softmax, norms, activations and the optimizer are not counted.

Hardware FLOPs (`hardware_flops_per_token`) add what activation recomputation runs again in the backward pass,
following Megatron's accounting (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", section 5.1; Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", appendix A):

  - recompute "none":      6 N_mm + 12 LHQT (= model FLOPs)
  - recompute "selective": 6 N_mm + 16 LHQT: the attention core (QK^T, softmax, @V) runs its forward again, +4 LHQT
  - recompute "full":      8 N_layers + 6 V d + 16 LHQT: every transformer layer runs its forward again, +2 N_layers
                           + 4 LHQT, where N_layers = the non-embedding parameters; the output projection sits
                           outside the checkpointed layers and is not recomputed.

For Megatron's GPT (h = d_model, 4h MLP, 12 h^2 matmul weights a layer, s = T) the "full" row is its F / (B s) =
96 l h^2 (1 + s/(6h) + V/(16 l h)) = 96 l h^2 + 16 l h s + 6 h V, and the "none" row Korthikanti's
72 l h^2 (1 + s/(6h) + V/(12 l h)) = 72 l h^2 + 12 l h s + 6 h V: "8N instead of 6N" for the layers' matmuls.

MFU = achieved tokens/s x model FLOPs per token / (devices x peak); HFU the same with hardware FLOPs. PaLM reports
both (46.2% MFU, 57.8% HFU for PaLM 540B with rematerialisation). Peaks: `peak_flops_of(device)`.
"""

from __future__ import annotations

import dataclasses

from engine.config import ModelConfig
from engine.metrics import _BF16_PEAK_FLOPS, model_flops_utilization
from engine.model.gpt import count_params, flops_per_token, resolve

__all__ = [
    "DEVICE_PEAK_FLOPS",
    "flops_per_token",
    "hardware_flops_per_token",
    "hardware_flops_utilization",
    "mtp_flops_per_token",
    "model_flops_utilization",
    "peak_flops_of",
    "training_flops",
]

RECOMPUTE = ("none", "selective", "full")

# Command-line device names -> the device's name as torch.cuda.get_device_name() reports it, whose dense (no 2:4
# sparsity) bf16 tensor-core peak engine.metrics keeps (one table for the trainer's MFU and for planning). From the
# vendors' data sheets, in TFLOP/s: H100 SXM 989 (1979 is the sparsity figure), H100 PCIe 756, H100 NVL 835, H200
# 989 (the H100's compute with more and faster memory), GH200 989, H800 989, B200 2250, A100 312 (SXM and PCIe),
# A800 312, L40S 362, L4 121, A10G 70, A10 125, RTX 4090 165, RTX 3090 71.
_DEVICE_NAMES = {
    "h100": "H100",
    "h100-sxm": "H100",
    "h100-pcie": "H100 PCIe",
    "h100-nvl": "H100 NVL",
    "h200": "H200",
    "gh200": "GH200",
    "h800": "H800",
    "b200": "B200",
    "a100": "A100",
    "a800": "A800",
    "l40s": "L40S",
    "l4": "L4",
    "a10g": "A10G",
    "a10": "A10",
    "rtx4090": "RTX 4090",
    "rtx3090": "RTX 3090",
}
DEVICE_PEAK_FLOPS: dict[str, float] = {k: dict(_BF16_PEAK_FLOPS)[v] for k, v in _DEVICE_NAMES.items()}


def peak_flops_of(device: str) -> float:
    """Dense bf16 peak FLOP/s of a device named as in `DEVICE_PEAK_FLOPS` (case-insensitive, e.g. "h100");
    ValueError (one line) for an unknown name."""
    key = device.strip().lower().replace("_", "-")
    if key not in DEVICE_PEAK_FLOPS:
        raise ValueError(f"unknown device {device!r}; one of {', '.join(DEVICE_PEAK_FLOPS)}")
    return DEVICE_PEAK_FLOPS[key]


def hardware_flops_per_token(cfg: ModelConfig, recompute: str | None = None) -> int:
    """FLOPs the hardware runs per trained token, recomputation included (see the module docstring for what each
    mode adds). `recompute` defaults to cfg.recompute; "none" gives `flops_per_token(cfg)`."""
    cfg = resolve(cfg)
    mode = cfg.recompute if recompute is None else recompute
    if mode not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {'|'.join(RECOMPUTE)}, got {mode!r}")
    model = flops_per_token(cfg)
    if mode == "none":
        return model
    head_dim = cfg.d_model // cfg.n_heads
    keys = min(cfg.seq_len, cfg.window) if cfg.window else cfg.seq_len
    attention_fwd = 4 * cfg.n_layers * cfg.n_heads * head_dim * keys  # QK^T and softmax @ V, one forward
    if mode == "selective":
        return model + attention_fwd
    return model + 2 * count_params(cfg, non_embedding=True) + attention_fwd  # full: the layers' forward again


def mtp_flops_per_token(cfg: ModelConfig, depth: int, kind: str = "sequential") -> int:
    """Model FLOPs per trained token of `depth` multi-token prediction modules (engine.model.mtp), forward + backward:
    each a transformer layer (6 N_layer + 12 H Q T, as a trunk layer) and an output-head call (6 V d), plus for the
    sequential kind its 2d -> d projection (6 x 2 d^2). Never recomputed, so the same in hardware FLOPs."""
    if not depth:
        return 0
    cfg = resolve(cfg)
    one = resolve(dataclasses.replace(cfg, n_layers=1))
    layer = count_params(one, non_embedding=True) - count_params(dataclasses.replace(one, n_layers=0),
                                                                 non_embedding=True)  # fmt: skip
    head_dim = cfg.d_model // cfg.n_heads
    keys = min(cfg.seq_len, cfg.window) if cfg.window else cfg.seq_len
    proj = 2 * cfg.d_model * cfg.d_model if kind == "sequential" else 0
    return depth * (6 * (layer + proj + cfg.vocab_size * cfg.d_model) + 12 * cfg.n_heads * head_dim * keys)


def training_flops(flops_per_token_: float, tokens: float) -> float:
    """C = FLOPs per token x tokens. With 6N per token this is the scaling laws' C = 6ND."""
    return flops_per_token_ * tokens


def hardware_flops_utilization(
    tokens_per_s: float, cfg: ModelConfig, peak: float | None, n_devices: int, recompute: str | None = None
) -> float | None:
    """HFU = tokens/s x hardware FLOPs per token (recomputation included) / (n_devices x peak); None without a
    peak. MFU is `model_flops_utilization(tokens_per_s, flops_per_token(cfg), peak, n_devices)`."""
    return model_flops_utilization(tokens_per_s, hardware_flops_per_token(cfg, recompute), peak, n_devices)
