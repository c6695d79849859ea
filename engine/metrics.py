"""Per-step training metrics: `RUN_DIR/metrics.jsonl`, TensorBoard (when installed) and a console progress bar.

One JSON object per optimizer step (the command-line contract in README.md): `step`, `loss`, `lr`, `grad_norm`,
`tokens`, `tokens_per_s`, `mfu` (null without a known peak, e.g. on CPU), `mem_gb`, plus `val_loss`/`val_ppl` on
eval steps (and `val_loss/<component>` for each component of a blended validation set). Only rank 0 writes. On
resume the file is appended to; records from a crashed run past the resumed step are dropped first so every step
appears once.

MFU (PaLM, Chowdhery et al. 2022, App. B) = achieved tokens/s x model FLOPs per token / (devices x peak FLOP/s),
against the dense bf16 peak of the device from a small table.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets. Matched against
# torch.cuda.get_device_name() in order, so more specific names come first.
_BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None where it is not known (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _BF16_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def model_flops_utilization(
    tokens_per_s: float, flops_per_token: float, peak: float | None, n_devices: int
) -> float | None:
    """MFU = tokens/s x FLOPs/token / (n_devices x peak); None without a peak."""
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (n_devices * peak)


def memory_gb(device: torch.device) -> float:
    """Peak memory in GB (1e9 bytes): allocated device memory on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb * 1024 / 1e9


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, skipping a torn last line left by a crash."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


SUPERSEDED_NAME = "metrics.superseded.jsonl"  # records a resume or a fresh start replaced


def drop_records_after(path: str | Path, step: int) -> int:
    """Moves records with `step` > step (a crashed run's steps that a resume will redo) out of `path` into
    `SUPERSEDED_NAME` beside it, with any line torn by a crash; returns how many lines moved. `path` then holds one
    record per step of the run's one timeline, and nothing that was logged is lost.

    The archive is appended and fsynced first, then `path` is rewritten under a temporary name and renamed, so a
    crash in between leaves a record in both files, never in neither.
    """
    p = Path(path)
    if not p.exists():
        return 0
    lines = p.read_text().splitlines()
    kept, dropped = [], []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped.append(line)  # a torn line from a crash: kept aside too (readers skip it there)
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped.append(line)
        else:
            kept.append(line)
    if not dropped:
        return 0
    with open(p.with_name(SUPERSEDED_NAME), "a") as f:
        f.write("".join(line + "\n" for line in dropped))
        f.flush()
        os.fsync(f.fileno())
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return len(dropped)


def _json_value(v: Any) -> Any:
    """Non-finite floats become null: JSON has no NaN/Infinity and readers choke on them."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """Writes one record per optimizer step to JSONL, TensorBoard and the console; a no-op off rank 0."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        start_step: int,
        total_steps: int,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        log_every: int = 1,
        console: bool = True,
    ) -> None:
        """`progress` shows a tqdm bar; without it, `console` prints a line every `log_every` steps."""
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.console = console
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        # Records past the resumed step belong to a crashed run and will be logged again; a fresh start (step 0)
        # redoes everything, including the step-0 evaluation.
        drop_records_after(self.path, start_step if start_step > 0 else -1)
        self._file = open(self.path, "a")
        if tensorboard:
            try:  # optional: torch's SummaryWriter needs the tensorboard package
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                self._tb = None
        if progress and total_steps > start_step:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def log(self, record: dict[str, Any]) -> None:
        """Appends `record` (must hold `step`) to the JSONL file and updates TensorBoard and the progress bar."""
        if not self.enabled:
            return
        rec = {k: _json_value(v) for k, v in record.items()}
        step = rec["step"]
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        post = {"loss": f"{rec['loss']:.4f}" if rec.get("loss") is not None else "nan"}
        if rec.get("lr") is not None:
            post["lr"] = f"{rec['lr']:.2e}"
        if rec.get("tokens_per_s") is not None:
            post["tok/s"] = f"{rec['tokens_per_s']:.0f}"
        if rec.get("mfu") is not None:
            post["mfu"] = f"{100 * rec['mfu']:.1f}%"
        if rec.get("mem_gb") is not None:
            post["mem"] = f"{rec['mem_gb']:.2f}GB"
        if rec.get("val_loss") is not None:
            post["val"] = f"{rec['val_loss']:.4f}"
        if self._bar is not None:
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(step - self._bar.n)
        elif self.console and (step % self.log_every == 0 or "val_loss" in rec):
            print(f"step {step} " + " ".join(f"{k} {v}" for k, v in post.items()), file=sys.stderr, flush=True)

    def rewind(self, step: int) -> None:
        """Moves the records past `step` aside (to `SUPERSEDED_NAME`), as a resume does: a rollback redoes them."""
        if not self.enabled:
            return
        self._file.close()
        drop_records_after(self.path, step)
        self._file = open(self.path, "a")
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def write(self, message: str) -> None:
        """Prints a line on rank 0 without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None
