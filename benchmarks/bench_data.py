"""Data-pipeline benchmark: index builders (C++ vs NumPy vs a plain Python loop), GPTDataset, preprocessing.

    python -m benchmarks.bench_data [--tokens 1e8] [--mean-doc 1000] [--seq-lens 2048,128] [--repeats 3]
                                    [--python-fraction 1.0] [--blend-size 1000000] [--no-gpt] [--no-preprocess]
                                    [--workers 1,2] [--tokenizers byte,bpe]

1. `build_sample_idx` over `--tokens` tokens of documents with log-normal lengths (mean `--mean-doc`, sigma 1), one
   shuffled epoch, for each sequence length: the C++ extension, the vectorised NumPy fallback and the plain Python
   walk (`build_sample_idx_python`). With `--python-fraction f < 1` the Python walk runs on the first f of the
   documents and its time is scaled by 1/f (it is linear in documents + samples); the output says so. C++ and NumPy
   results are compared for equality on the same input.
2. `build_blending_indices` for `--blend-size` samples over 3 datasets: C++ vs the NumPy-module fallback loop.
3. `GPTDataset` on the same documents written as a real .bin/.idx: index build (cache miss), reload (cache hit),
   and random-access `ds[k]` samples/s.
4. Preprocessing throughput: `python -m engine.data.preprocess --input embedded` (the embedded corpus) per tokenizer
   and worker count: wall time of the whole command (start-up included), tokens written (read back from the
   output), tokens/s and tokens/s per worker, and the CPU seconds of the command and its workers (tokens per CPU
   second is the per-worker figure that survives a busy machine). The BPE tokenizer is trained/cached before
   timing. The CLI's own summary line (its internal timer) is printed too.

Best of `--repeats` for the fast paths; one run for the slow ones. Prints a table per section.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from engine.data import helpers


def _best(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n## {title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def make_documents(tokens: int, mean_doc: float, seed: int = 0) -> np.ndarray:
    """int32 document lengths, log-normal with the given mean (sigma 1), at least 1, summing to >= `tokens`."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    n = int(tokens / mean_doc * 1.2) + 16
    sizes = np.maximum(rng.lognormal(np.log(mean_doc) - sigma**2 / 2, sigma, n), 1).astype(np.int32)
    return sizes[: int(np.searchsorted(np.cumsum(sizes, dtype=np.int64), tokens)) + 1]


def bench_sample_idx(sizes: np.ndarray, seq_lens: list[int], repeats: int, python_fraction: float) -> None:
    rng = np.random.default_rng(1)
    document_idx = np.arange(len(sizes), dtype=np.int32)
    rng.shuffle(document_idx)
    tokens = int(sizes.sum(dtype=np.int64))
    rows = []
    for seq_len in seq_lens:
        args = (sizes, document_idx, seq_len, 1, tokens)
        times = {}
        if helpers.cpp_available():
            times["C++"], cpp = _best(partial(helpers.build_sample_idx, *args, impl="cpp"), repeats)
        times["NumPy"], ref = _best(partial(helpers.build_sample_idx, *args, impl="numpy"), repeats)
        if helpers.cpp_available() and not np.array_equal(cpp, ref):
            raise SystemExit(f"C++ and NumPy sample indices differ at seq_len {seq_len}")
        if python_fraction >= 1:
            times["Python loop"], _ = _best(partial(helpers.build_sample_idx_python, *args), 1)
            note = "full run"
        else:
            part = document_idx[: max(1, int(len(document_idx) * python_fraction))]
            part_tokens = int(sizes[part].sum(dtype=np.int64))
            t, _ = _best(partial(helpers.build_sample_idx_python, sizes, part, seq_len, 1, part_tokens), 1)
            times["Python loop"] = t * tokens / part_tokens
            note = f"timed on {python_fraction:.0%} of the documents, scaled x{tokens / part_tokens:.1f}"
        for impl, t in times.items():
            speedup = times["Python loop"] / t
            rows.append(
                [str(seq_len), f"{len(ref) - 1:,}", impl, f"{t * 1e3:.3g}", f"{speedup:.0f}x",
                 note if impl == "Python loop" else ("identical to NumPy" if impl == "C++" else "")]
            )  # fmt: skip
    _table(
        f"build_sample_idx: {tokens / 1e6:.0f}M tokens, {len(sizes):,} documents (log-normal, mean "
        f"{tokens / len(sizes):.0f} tokens), 1 epoch",
        ["seq_len", "samples", "impl", "ms", "vs Python", "note"],
        rows,
    )


def bench_blending(size: int, repeats: int) -> None:
    weights = np.array([0.5, 0.3, 0.2])
    rows = []
    times = {}
    if helpers.cpp_available():
        times["C++"], cpp = _best(lambda: helpers.build_blending_indices(weights, size, impl="cpp"), repeats)
    times["NumPy module (Python loop)"], ref = _best(lambda: helpers.build_blending_indices(weights, size, "numpy"), 1)
    if helpers.cpp_available() and not all(np.array_equal(a, b) for a, b in zip(cpp, ref)):
        raise SystemExit("C++ and NumPy blending indices differ")
    for impl, t in times.items():
        rows.append([impl, f"{t * 1e3:.3g}", f"{size / t / 1e6:.1f}"])
    _table(f"build_blending_indices: {size:,} samples, 3 datasets", ["impl", "ms", "M samples/s"], rows)


def bench_gpt_dataset(sizes: np.ndarray, seq_len: int, repeats: int) -> None:
    from engine.data.gpt_dataset import GPTDataset
    from engine.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "bench")
        t = time.perf_counter()
        tokens = rng.integers(0, 50_000, int(sizes.sum(dtype=np.int64)), dtype=np.uint16)
        ends = np.cumsum(sizes, dtype=np.int64)
        with IndexedDatasetBuilder(prefix, np.uint16) as builder:
            for begin, end in zip(ends - sizes, ends):
                builder.add_document(tokens[begin:end])
        write_s = time.perf_counter() - t
        del tokens
        cache = os.path.join(tmp, "cache")
        t = time.perf_counter()
        ds = GPTDataset(prefix, None, seq_len, seed=1234, cache_dir=cache)
        build_s = time.perf_counter() - t
        hit_s, ds2 = _best(lambda: GPTDataset(prefix, None, seq_len, seed=1234, cache_dir=cache), repeats)
        assert ds2.cache_hit and not ds.cache_hit
        ks = np.random.default_rng(3).integers(0, len(ds), 5000)
        get_s, _ = _best(lambda: [ds2[int(k)] for k in ks], repeats)
        rows = [
            ["write .bin/.idx (IndexedDatasetBuilder)", f"{write_s:.2f} s", f"{len(sizes):,} documents"],
            ["GPTDataset indices, cache miss (build + save)", f"{build_s * 1e3:.0f} ms", f"{len(ds):,} samples"],
            ["GPTDataset indices, cache hit (mmap load)", f"{hit_s * 1e3:.1f} ms", ""],
            ["ds[k], random k", f"{len(ks) / get_s:,.0f} samples/s",
             f"{len(ks) / get_s * (seq_len + 1) / 1e6:.0f}M tok/s"],
        ]  # fmt: skip
        _table(f"GPTDataset: {int(sizes.sum()) / 1e6:.0f}M tokens, seq_len {seq_len}", ["step", "time", "size"], rows)


def bench_preprocess(workers: list[int], tokenizers: list[str]) -> None:
    if importlib.util.find_spec("engine.data.preprocess") is None:
        print("\n## preprocess: SKIPPED, engine.data.preprocess is not present in this checkout (no figures made up)")
        return
    from engine.data.indexed_dataset import IndexedDataset
    from engine.data.tokenizer import load_tokenizer

    rows, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for tok in tokenizers:
            t = time.perf_counter()
            load_tokenizer(tok)  # trains and caches the BPE once, outside the timed runs
            prep_s = time.perf_counter() - t
            for n in workers:
                prefix = os.path.join(tmp, f"{tok}-{n}")
                cmd = [sys.executable, "-m", "engine.data.preprocess", "--input", "embedded", "--tokenizer", tok,
                       "--output-prefix", prefix, "--workers", str(n)]  # fmt: skip
                t, r = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - t
                r2 = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the pool workers, reaped by the CLI
                cpu = (r2.ru_utime - r.ru_utime) + (r2.ru_stime - r.ru_stime)
                own = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "tokens/s" in ln]
                lines.append(f"{tok}, {n} workers: {own[-1].strip() if own else '(no summary line)'}")
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                    raise SystemExit(f"preprocess failed ({' '.join(cmd)}): {tail}")
                ds = IndexedDataset(prefix)
                rows.append(
                    [tok, str(n), f"{ds.num_documents:,}", f"{ds.num_tokens / 1e6:.2f}M", f"{wall:.2f}",
                     f"{ds.num_tokens / wall:,.0f}", f"{ds.num_tokens / wall / n:,.0f}", f"{cpu:.2f}",
                     f"{ds.num_tokens / cpu:,.0f}",
                     f"{prep_s:.1f} s" if n == workers[0] else ""]
                )  # fmt: skip
    _table(
        "preprocess --input embedded (wall time of the whole command, start-up included)",
        ["tokenizer", "workers", "docs", "tokens", "wall s", "tokens/s", "tokens/s/worker", "CPU s", "tokens/CPU-s",
         "tokenizer load/train"],
        rows,
    )  # fmt: skip
    print("the CLI's own summary lines (its timer, without interpreter start-up):")
    for line in lines:
        print("  " + line)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=1e8)
    p.add_argument("--mean-doc", type=float, default=1000)
    p.add_argument("--seq-lens", default="2048,128")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--python-fraction", type=float, default=1.0)
    p.add_argument("--blend-size", type=int, default=1_000_000)
    p.add_argument("--no-gpt", action="store_true")
    p.add_argument("--no-preprocess", action="store_true")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--tokenizers", default="byte,bpe")
    args = p.parse_args(argv)
    if not 0 < args.python_fraction <= 1:
        raise SystemExit("--python-fraction must be in (0, 1]")
    print(f"C++ extension: {'built' if helpers.cpp_available() else 'NOT built (NumPy only)'}; cores: {os.cpu_count()}")
    sizes = make_documents(int(args.tokens), args.mean_doc)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    bench_sample_idx(sizes, seq_lens, args.repeats, args.python_fraction)
    bench_blending(args.blend_size, args.repeats)
    if not args.no_gpt:
        bench_gpt_dataset(sizes, seq_lens[0], args.repeats)
    if not args.no_preprocess:
        bench_preprocess([int(w) for w in args.workers.split(",")], args.tokenizers.split(","))


if __name__ == "__main__":
    main()
