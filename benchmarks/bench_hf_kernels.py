"""A transformers Llama model with and without our kernels (`engine.hf.apply_kernels`): peak memory and step time.

    python -m benchmarks.bench_hf_kernels [--batch 4 --seq 2048] [--json out.json]   # a lent GPU, bf16
    python -m benchmarks.bench_hf_kernels --device cpu                             # CPU: a tiny smoke of the paths

A Llama-3-style `LlamaForCausalLM` with a 128,256-token vocabulary (hidden 2048, 4 layers, 16 heads, 8 KV heads,
intermediate 5632; random weights, bf16 parameters) is built twice from one seed: "transformers" as is, "ours" after
`apply_kernels` (RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy loss). A step is forward with labels and
backward (no optimizer: it would add the same memory and time to both). Reported per variant: the median step time
over `--steps` steps after one warm-up step, tokens/s, the peak CUDA memory of a step above what the model held before
it (`torch.cuda.max_memory_allocated`), and the first step's loss; the two losses must agree to 1e-2 relative (else
the row is marked BAD and the exit status is 1). With 128k logits the loss dominates the activation memory: the
unpatched model holds the bf16 logits, their fp32 copy and its gradient (N x V each), ours one chunk of them.
`--device cpu` runs the same code on a tiny config (vocab 257) and reports no memory; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

GPU_CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)  # fmt: skip
CPU_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=257, max_position_embeddings=64)  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name: str, cfg: dict, batch: int, seq: int, steps: int, device: torch.device) -> dict:
    """Builds the model (patched for "ours"), runs 1 + `steps` forward/backward steps; the row of figures."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.hf import apply_kernels

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:  # initialised on the device: a 128k-vocab model's fp32 init on the host takes tens of seconds
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    if name == "ours":
        apply_kernels(model)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g).to(device)
    times, first_loss = [], None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        _sync(device)
        if i == 0:
            first_loss = loss.item()
        else:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        del loss
    step_s = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    del model
    return {"variant": name, "step_ms": step_s * 1e3, "tokens_per_s": batch * seq / step_s, "peak_gib": peak,
            "loss": first_loss}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch", type=int, help="sequences per step (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 2048 on CUDA, 16 on CPU)")
    p.add_argument("--steps", type=int, help="timed steps after one warm-up (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench_hf_kernels: needs the transformers package (pip install transformers)")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_hf_kernels: no CUDA device here (use --device cpu for the smoke run)")
        return 2
    gpu = args.device == "cuda"
    cfg = GPU_CONFIG if gpu else CPU_CONFIG
    batch, seq = args.batch or (4 if gpu else 2), args.seq or (2048 if gpu else 16)
    steps = args.steps or (5 if gpu else 1)
    device = torch.device(args.device)
    rows = [run_variant(name, cfg, batch, seq, steps, device) for name in ("transformers", "ours")]
    if gpu:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"Llama vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"batch {batch} x seq {seq}")  # fmt: skip
    print(f"{'variant':>13} {'step ms':>9} {'tokens/s':>10} {'peak GiB':>9} {'loss':>8}")
    want = rows[0]["loss"]
    bad = False
    for r in rows:
        flag = " BAD" if abs(r["loss"] - want) > 1e-2 * abs(want) else ""
        bad |= bool(flag)
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"{r['variant']:>13} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} {peak:>9} {r['loss']:>8.4f}{flag}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
