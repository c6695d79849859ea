"""Checkpoint save and load throughput, the training-step stall of an async save, and the time a torchrun job takes
from a rank's SIGKILL to its first step after the restart.

    python -m benchmarks.bench_checkpoint [--device cpu|cuda] [--size-gb 1.0] [--repeats 3] [--steps 5]
                                          [--batch 16] [--save-at 2] [--restart] [--restart-repeats 3] [--dir DIR]
                                          [--json out.json] [--smoke]

State: an `nn.Sequential` of square fp32 `nn.Linear` layers (width 2048, or smaller for small sizes) with AdamW, one
optimizer step taken so its two moments exist: parameters plus moments are 12 bytes per parameter, and the number of
layers makes them about `--size-gb` GB (GB = 10^9 bytes; the exact byte count is reported and is what every GB/s is
divided into). Files go to a temporary directory under `--dir` (default: the system temp directory; it should be on
the disk the repository is on, as a run directory would be), removed at the end.

Device (`--device`, default cpu; `cuda` is refused in one line when torch sees no CUDA device): the model, its AdamW
state, the training batches and the fresh load targets live there, and the torch.save/torch.load peer saves and loads
those same device tensors (torch.load with map_location=device). On cuda every clock is read after a
torch.cuda.synchronize, so a time covers the device work it started; saves copy device tensors to host memory (the
engine's async save into pinned memory with non-blocking copies and one synchronize, see
engine/checkpoint/async_saver.py `stage_tree`), loads copy host tensors to the device, both inside the timings. The
first staging of a process allocates its pinned buffers (cudaHostAlloc; PyTorch's caching host allocator reuses them
afterwards): on cuda one untimed staging of the whole state (`first_stage_s` in the stall results) comes before the
saves, so every timed save is the steady state of a training run's later saves. The training batch defaults to 16
rows on cpu and 16384 on cuda (`--batch`): 16384 rows are the tokens of 8 sequences of 2048, a realistic micro-batch
for a GPU; a step (6 x rows x parameters FLOP, 8.2 TFLOP at 1 GB of state, fp32 matmuls without TF32) takes about
0.15-0.2 s on an H100 or H200, within the tens to hundreds of ms of a real training step, so the stall as % of a step
is comparable with the target (under 5% of a step).

Save (one process, no process group), each the median of `--repeats`, the three kinds interleaved in every repeat:
- torch.save: `torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)`, flush, fsync: the peer;
- engine sync: `engine.checkpoint.save(run_dir, step, model=, optimizer=)`: the same bytes per file plus a sha256 of
  every file, the manifest, fsyncs of files and directories, the atomic rename and `latest`;
- engine async: `save(..., saver=AsyncSaver())`: "stall" is the call (finite check, staging = a host copy of every
  tensor, thread start), "total" the call through `saver.wait()`.
Load, into a fresh model and AdamW (allocated on the meta device and materialised empty, outside the timing), each the
median of `--repeats`: torch.load(weights_only=True) + `load_state_dict` of both, vs `engine.checkpoint.load`
(checksums of every file verified first, then each tensor read from memory-mapped files). "cold": every file of the
checkpoint evicted from the page cache first with posix_fadvise(DONTNEED) (dropping the whole page cache would need
/proc/sys/vm/drop_caches and disturb other jobs; on a VM the host may still cache the disk, so cold is a lower bound
on a real cold read); "warm": the files just read. Every load is checked to reproduce the saved parameters and moments
exactly (outside the timing).

Step stall: training steps on the same model (forward of a random `--batch` x width batch, loss = mean square of the
output, backward, AdamW step, grads set to None). The mean of `--steps` steps without saves (after one warm-up) is the
step time; then an async save is launched after step `--save-at` of a second loop: its call's time is the stall (also
as % of a step; on cuda it is the finite check, the device-to-pinned-host copies and their synchronize), the steps
that start while the background write is in flight are "overlapped" (their mean over the step time is the slowdown:
on a CPU the writer's pickling, sha256 and I/O compete with the step for the same cores; on a GPU only the step's
Python launching does), and `--steps` steps after the write has finished check the step time did not drift.

Restart (`--restart`): a torchrun job (2 gloo ranks, `--max-restarts 2`, c10d rendezvous) of the engine's trainer on
the tiny model and data of tests/train/conftest.py (checkpoints every 2 steps, `--resume auto`) through a launcher
script written into the temporary directory, as tests/resilience/test_elastic_restart.py does: on the first attempt
rank 1 SIGKILLs itself as step 4 begins; the launcher records wall-clock times of each worker's start and each step.
Reported: kill -> first worker of the restarted attempt starts (torchrun noticing the failure, stopping the other
rank, rendezvous, process start) and kill -> first step after the restart (plus imports, setup, checkpoint load), the
median of `--restart-repeats` jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
KILL_STEP, RESTART_STEPS, RESTART_CKPT_EVERY = 4, 6, 2

LAUNCHER = r"""
import json, os, signal, sys, time

EVENTS = os.environ["BENCH_EVENTS"]
KILL_STEP = int(os.environ["BENCH_KILL_STEP"])
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))


def event(kind, **kw):
    with open(EVENTS, "a") as f:
        f.write(json.dumps({"attempt": ATTEMPT, "rank": RANK, "event": kind, "t": time.time(), **kw}) + "\n")
        f.flush()
        os.fsync(f.fileno())


event("start")
import engine.train  # noqa: E402

_original = engine.train._Run.train_step


def train_step(self):
    step = self.step + 1  # the step about to run
    event("step", step=step)
    if ATTEMPT == 0 and RANK == 1 and step == KILL_STEP:
        event("kill", step=step)
        os.kill(os.getpid(), signal.SIGKILL)
    return _original(self)


engine.train._Run.train_step = train_step
sys.exit(engine.train.main(sys.argv[1:]))
"""


# ---------------------------------------------------------------------------------------------------------- state


def _shape(size_gb: float) -> tuple[int, int]:
    """(width, layers) of square Linear layers whose parameters and AdamW moments make about `size_gb` GB."""
    params = size_gb * GB / 12
    width = 2048 if params >= 8 * 2048 * 2049 else max(8, int(math.sqrt(params / 8)))
    return width, max(1, round(params / (width * width + width)))


def _sync(device: torch.device) -> None:
    """Waits for the device's queued work (before reading a clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(width: int, layers: int, device: torch.device,
           meta: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:  # fmt: skip
    if meta:
        with torch.device("meta"):
            model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
        model = model.to_empty(device=device)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(width, width, device=device) for _ in range(layers)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    model(batch).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for s in opt.state.values():
        n += sum(v.numel() * v.element_size() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    return n


def _same(src: tuple[nn.Module, torch.optim.Optimizer], dst: tuple[nn.Module, torch.optim.Optimizer]) -> None:
    """The loaded model and moments equal the saved ones exactly."""
    for (n, a), b in zip(src[0].named_parameters(), dst[0].parameters()):
        if not torch.equal(a, b):
            raise AssertionError(f"loaded parameter {n} differs from the saved one")
        sa, sb = src[1].state[a], dst[1].state[b]
        for k in ("exp_avg", "exp_avg_sq", "step"):
            x, y = sa[k], sb[k]
            if x.device != y.device:  # AdamW's step may sit on the host whatever the parameter's device
                x, y = x.cpu(), y.cpu()
            if not torch.equal(x, y):
                raise AssertionError(f"loaded optimizer state {n}.{k} differs from the saved one")


def _evict(path: Path) -> None:
    """Drops the page-cache pages of every file under `path` (or of the file `path`)."""
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _summary(times: list[float], nbytes: int) -> dict:
    s, best = statistics.median(times), min(times)
    return {"s": s, "gbps": nbytes / GB / s, "best_s": best, "best_gbps": nbytes / GB / best,
            "all_s": [round(t, 4) for t in times]}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- save/load


def _torch_save(model: nn.Module, opt: torch.optim.Optimizer, path: Path) -> float:
    _sync(next(model.parameters()).device)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def _saves(model: nn.Module, opt: torch.optim.Optimizer, work: Path, repeats: int, nbytes: int,
           device: torch.device) -> tuple[dict, dict]:  # fmt: skip
    """Save timings; returns (results, {"torch": file, "engine": run dir} of the last repeat, kept for the loads)."""
    from engine.checkpoint import AsyncSaver, save

    times: dict[str, list[float]] = {"torch_save": [], "engine_sync": [], "engine_async_stall": [],
                                     "engine_async_total": []}  # fmt: skip
    kept: dict[str, Path] = {}
    tiny = _build(8, 1, device)  # warm-up of each kind (first-call costs) on a tiny model, not timed
    _step(*tiny, torch.randn(2, 8, device=device))
    _torch_save(*tiny, work / "warmup.pt")
    save(work / "warmup", 1, model=tiny[0], optimizer=tiny[1])
    saver = AsyncSaver()
    save(work / "warmup", 2, model=tiny[0], optimizer=tiny[1], saver=saver)
    saver.wait()
    shutil.rmtree(work / "warmup")
    (work / "warmup.pt").unlink()
    for r in range(repeats):
        last = r == repeats - 1
        path = work / f"torch_{r}.pt"
        times["torch_save"].append(_torch_save(model, opt, path))
        if not last:
            path.unlink()
        kept["torch"] = path

        run_dir = work / f"engine_sync_{r}"
        _sync(device)
        t0 = time.perf_counter()
        save(run_dir, 1, model=model, optimizer=opt)
        times["engine_sync"].append(time.perf_counter() - t0)
        if not last:
            shutil.rmtree(run_dir)
        kept["engine"] = run_dir

        run_dir = work / f"engine_async_{r}"
        saver = AsyncSaver()
        _sync(device)
        t0 = time.perf_counter()
        save(run_dir, 1, model=model, optimizer=opt, saver=saver)
        _sync(device)  # (stage_tree has synchronised already)
        t1 = time.perf_counter()
        saver.wait()
        t2 = time.perf_counter()
        times["engine_async_stall"].append(t1 - t0)
        times["engine_async_total"].append(t2 - t0)
        shutil.rmtree(run_dir)
    return {k: _summary(v, nbytes) for k, v in times.items()}, kept


def _torch_load(path: Path, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> None:
    sd = torch.load(path, weights_only=True, map_location=device)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optim"])


def _loads(src: tuple[nn.Module, torch.optim.Optimizer], kept: dict, width: int, layers: int, repeats: int,
           nbytes: int, device: torch.device) -> dict:  # fmt: skip
    from engine.checkpoint import load

    loaders = {"torch_load": lambda m, o: _torch_load(kept["torch"], m, o, device),
               "engine_load": lambda m, o: load(kept["engine"], model=m, optimizer=o)}  # fmt: skip
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, loader in loaders.items():
            files = kept["torch"] if name == "torch_load" else kept["engine"]
            for cache in ("cold", "warm"):  # the cold load reads the files back into the cache for the warm one
                dst = _build(width, layers, device, meta=True)
                if cache == "cold":
                    _evict(files)
                _sync(device)
                t0 = time.perf_counter()
                loader(*dst)
                _sync(device)
                times.setdefault(f"{name}_{cache}", []).append(time.perf_counter() - t0)
                _same(src, dst)
                del dst
    return {k: _summary(v, nbytes) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------------------- stall


def _first_stage(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """Stages the whole state into pinned host memory once, untimed by the rest (the first staging of a process
    allocates its pinned buffers; the caching host allocator hands them to every later save); returns its time."""
    from engine.checkpoint.async_saver import stage_tree

    _sync(next(model.parameters()).device)
    t0 = time.perf_counter()
    staged = stage_tree({"model": model.state_dict(), "optim": opt.state_dict()})
    first = time.perf_counter() - t0
    del staged  # its pinned blocks go back to the caching host allocator
    return first


def _stall(model: nn.Module, opt: torch.optim.Optimizer, work: Path, steps: int, batch_size: int, save_at: int,
           width: int, device: torch.device) -> dict:  # fmt: skip
    from engine.checkpoint import AsyncSaver, save

    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(batch_size, width, generator=gen).to(device)

    def timed() -> float:
        _sync(device)
        t0 = time.perf_counter()
        _step(model, opt, batch)
        _sync(device)
        return time.perf_counter() - t0

    timed()  # warm-up
    base = [timed() for _ in range(steps)]
    step_s = statistics.mean(base)  # (the median is in the JSON too: a shared machine's steps vary)

    saver = AsyncSaver()
    for _ in range(save_at):
        timed()
    _sync(device)
    t0 = time.perf_counter()
    save(work / "engine_stall", 2, model=model, optimizer=opt, saver=saver)
    _sync(device)
    stall_s = time.perf_counter() - t0
    overlapped: list[float] = []
    while saver.busy or not overlapped:  # the first step after the call starts while the write runs
        overlapped.append(timed())
    record = saver.wait()
    after = [timed() for _ in range(steps)]
    shutil.rmtree(work / "engine_stall")
    over_s = statistics.mean(overlapped)
    return {"step_s": step_s, "step_median_s": statistics.median(base),
            "base_all_s": [round(t, 4) for t in base], "stall_s": stall_s,
            "stall_pct": 100 * stall_s / step_s, "write_s": record.write_s, "overlapped_steps": len(overlapped),
            "overlapped_step_s": over_s, "overlapped_all_s": [round(t, 4) for t in overlapped],
            "slowdown": over_s / step_s, "after_step_s": statistics.mean(after)}  # fmt: skip


# -------------------------------------------------------------------------------------------------------- restart


def _restart_once(work: Path, data: tuple[str, str], i: int, timeout: float = 240.0) -> dict:
    from tests.distributed import free_port
    from tests.train.conftest import tiny_args

    script = work / "launcher.py"
    script.write_text(LAUNCHER)
    events = work / f"restart_{i}.events.jsonl"
    run_dir = work / f"restart_{i}"
    flags = tiny_args(run_dir, *data, train__steps=RESTART_STEPS, checkpoint__every=RESTART_CKPT_EVERY,
                      optim__decay_steps=RESTART_STEPS, eval__every=3)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "ENGINE_CACHE": str(work / "engine_cache"), "OMP_NUM_THREADS": "1",
           "BENCH_EVENTS": str(events), "BENCH_KILL_STEP": str(KILL_STEP)}  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--max-restarts", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "--monitor-interval", "0.5", str(script), *flags, "--resume", "auto",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        output, _ = proc.communicate()
        raise RuntimeError(f"torchrun did not finish within {timeout} s:\n{output[-4000:]}") from None
    job_s = time.perf_counter() - t0
    recs = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
    kills = [e for e in recs if e["event"] == "kill"]
    starts = [e["t"] for e in recs if e["attempt"] == 1 and e["event"] == "start"]
    steps = sorted((e for e in recs if e["attempt"] == 1 and e["event"] == "step"), key=lambda e: e["t"])
    if proc.returncode != 0 or len(kills) != 1 or not starts or not steps:
        raise RuntimeError(f"restart job failed (exit {proc.returncode}, {len(kills)} kills, attempt-1 starts "
                           f"{len(starts)}, steps {len(steps)}):\n{output[-4000:]}")  # fmt: skip
    t_kill = kills[0]["t"]
    resumed = [line for line in output.splitlines() if line.startswith("resumed from")]
    return {"kill_to_start_s": min(starts) - t_kill, "kill_to_first_step_s": steps[0]["t"] - t_kill,
            "first_step": steps[0]["step"], "resumed": resumed[0] if resumed else None, "job_s": job_s}  # fmt: skip


def _restart(work: Path, repeats: int) -> dict:
    from tests.train.conftest import build_tiny_data

    (work / "data").mkdir()
    data = build_tiny_data(work / "data")
    runs = [_restart_once(work, data, i) for i in range(repeats)]
    return {"kill_to_start_s": statistics.median(r["kill_to_start_s"] for r in runs),
            "kill_to_first_step_s": statistics.median(r["kill_to_first_step_s"] for r in runs),
            "runs": runs}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- main


def _best_ratio(save_res: dict, load_res: dict, key: str) -> float:
    """A ratio of `main`'s (engine GB/s over torch's) from the best repeats instead of the medians."""
    if key.startswith("save_"):
        ours = "engine_sync" if "sync" in key else "engine_async_total"
        return save_res[ours]["best_gbps"] / save_res["torch_save"]["best_gbps"]
    cache = key.rpartition("_")[2]
    return load_res[f"engine_load_{cache}"]["best_gbps"] / load_res[f"torch_load_{cache}"]["best_gbps"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model, state and batches live")
    p.add_argument("--size-gb", type=float, default=1.0, help="parameters + AdamW moments, 10^9 bytes")
    p.add_argument("--repeats", type=int, default=3, help="save/load timings: the median of this many")
    p.add_argument("--steps", type=int, default=5, help="training steps timed without saves, and after the write")
    p.add_argument("--batch", type=int, default=None, help="rows of the training batch (default: 16 on cpu, 16384 "
                   "on cuda, see the module docstring)")  # fmt: skip
    p.add_argument("--save-at", type=int, default=2, help="steps of the second loop before the async save")
    p.add_argument("--restart", action="store_true", help="also time a torchrun SIGKILL restart")
    p.add_argument("--restart-repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where the temporary directory goes (same disk as runs)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--smoke", action="store_true", help="tiny: 0.01 GB, 1 repeat, 3 steps, no restart")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_checkpoint: --device cuda but torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    if a.batch is None:
        a.batch = 16384 if device.type == "cuda" else 16
    if a.smoke:
        a.size_gb, a.repeats, a.steps, a.save_at, a.restart = 0.01, 1, 3, 1, False

    width, layers = _shape(a.size_gb)
    model, opt = _build(width, layers, device)
    _step(model, opt, torch.randn(a.batch, width, device=device))  # AdamW's moments exist
    nbytes = _state_bytes(model, opt)
    first_stage_s = _first_stage(model, opt) if device.type == "cuda" else None
    work = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=a.dir))
    same_disk = os.stat(work).st_dev == os.stat(REPO).st_dev
    config = {"device": a.device,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "size_gb": a.size_gb, "state_bytes": nbytes, "params": sum(p.numel() for p in model.parameters()),
              "width": width, "layers": layers, "batch": a.batch, "repeats": a.repeats, "steps": a.steps,
              "dir": str(work), "same_disk_as_repo": same_disk, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "load_avg": os.getloadavg()}  # fmt: skip
    try:
        save_res, kept = _saves(model, opt, work, a.repeats, nbytes, device)
        load_res = _loads((model, opt), kept, width, layers, a.repeats, nbytes, device)
        shutil.rmtree(kept["engine"])
        kept["torch"].unlink()
        stall = _stall(model, opt, work, a.steps, a.batch, a.save_at, width, device)
        if first_stage_s is not None:
            stall["first_stage_s"] = first_stage_s
        restart = _restart(work, a.restart_repeats) if a.restart else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config["load_avg_end"] = os.getloadavg()
    ratios = {
        "save_engine_sync_vs_torch": save_res["engine_sync"]["gbps"] / save_res["torch_save"]["gbps"],
        "save_engine_async_total_vs_torch": save_res["engine_async_total"]["gbps"] / save_res["torch_save"]["gbps"],
        "load_engine_vs_torch_cold": load_res["engine_load_cold"]["gbps"] / load_res["torch_load_cold"]["gbps"],
        "load_engine_vs_torch_warm": load_res["engine_load_warm"]["gbps"] / load_res["torch_load_warm"]["gbps"],
    }
    ratios.update({f"{k}_best": _best_ratio(save_res, load_res, k) for k in ratios})
    results = {"config": config, "save": save_res, "load": load_res, "ratios": ratios, "stall": stall,
               "restart": restart}  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))

    where = config["device_name"] or "cpu"
    print(f"{where}: state {nbytes / GB:.3f} GB ({config['params']:,} fp32 parameters + AdamW moments: {layers} x "
          f"Linear({width}, {width})); {a.repeats} repeats (median); dir {work.parent} (same disk as repo: "
          f"{same_disk}); load average {config['load_avg'][0]:.1f} -> {config['load_avg_end'][0]:.1f}")  # fmt: skip
    print(f"{'what':<34} {'s':>8} {'GB/s':>7} {'vs torch':>9} {'best s':>8} {'best GB/s':>10} {'vs torch':>9}")
    rows = [("save torch.save + fsync", save_res["torch_save"], "torch_save"),
            ("save engine sync", save_res["engine_sync"], "torch_save"),
            ("save engine async: total", save_res["engine_async_total"], "torch_save"),
            ("save engine async: stall (call)", save_res["engine_async_stall"], None),
            ("load torch.load cold", load_res["torch_load_cold"], "torch_load_cold"),
            ("load engine cold", load_res["engine_load_cold"], "torch_load_cold"),
            ("load torch.load warm", load_res["torch_load_warm"], "torch_load_warm"),
            ("load engine warm", load_res["engine_load_warm"], "torch_load_warm")]  # fmt: skip
    for label, r, peer in rows:
        ref = save_res.get(peer) or load_res.get(peer) if peer else None
        ratio = f"{r['gbps'] / ref['gbps']:.2f}x" if ref else "-"
        best = f"{r['best_gbps'] / ref['best_gbps']:.2f}x" if ref else "-"
        print(f"{label:<34} {r['s']:>8.3f} {r['gbps']:>7.3f} {ratio:>9} {r['best_s']:>8.3f} {r['best_gbps']:>10.3f} "
              f"{best:>9}")  # fmt: skip
    target = " (target: under 5%)" if device.type == "cuda" else ""
    print(f"train step (batch {a.batch}, {a.device}) {stall['step_s']:.3f} s; async save stall {stall['stall_s']:.3f} "
          f"s = {stall['stall_pct']:.1f}% of a step{target}; write {stall['write_s']:.2f} s overlapped "
          f"{stall['overlapped_steps']} steps at {stall['overlapped_step_s']:.3f} s ({stall['slowdown']:.2f}x); after: "
          f"{stall['after_step_s']:.3f} s")  # fmt: skip
    if restart:
        print(f"restart (median of {len(restart['runs'])}): kill -> workers start {restart['kill_to_start_s']:.2f} s, "
              f"-> first step {restart['kill_to_first_step_s']:.2f} s (runs: "
              + ", ".join(f"{r['kill_to_first_step_s']:.2f}" for r in restart["runs"]) + ")")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
