"""The activations a pipeline schedule keeps alive, counted as live autograd saved tensors on each rank: GPipe holds
every micro-batch's, 1F1B and ZB-H1 at most pp - stage micro-batches' (the bound the schedules are built for)."""

import contextlib
import weakref

import pytest
import torch
import torch.distributed as dist

from engine.config import Config, ModelConfig
from engine.model.gpt import GPT
from engine.parallel.dims import ParallelDims
from engine.parallel.parallelize import parallelize_gpt
from engine.parallel.pipeline.runner import PipelineRunner
from tests.distributed import run_distributed

CFG = dict(n_layers=4, d_model=16, n_heads=2, vocab_size=32, seq_len=8, kernels="torch")


class _Live:
    """Counts saved tensors alive (packed by autograd, not yet freed with their graph); remembers the peak."""

    def __init__(self):
        self.now = self.peak = 0

    def pack(self, t):
        self.now += 1
        self.peak = max(self.peak, self.now)
        holder = _Holder(t)
        weakref.finalize(holder, self._free)
        return holder

    def _free(self):
        self.now -= 1


class _Holder:
    def __init__(self, t):
        self.t = t


def _peak(runner, batches, n_tokens):
    live = _Live()
    with torch.autograd.graph.saved_tensors_hooks(live.pack, lambda h: h.t):
        runner.run(batches, n_tokens)
    return live.peak


def _worker(rank, world):
    conf = Config(model=ModelConfig(**CFG))
    dims = ParallelDims.from_world(pp=2)
    try:
        with torch.device("meta"):
            whole = GPT(conf.model)
        chunks = parallelize_gpt(whole, dims, conf, device="cpu")
        ranks, pp_rank = dist.get_process_group_ranks(dims.group("pp")), dims.rank_in("pp")
        tokens = torch.randint(0, 32, (8, 1, 9), generator=torch.Generator().manual_seed(0))
        batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
        n = torch.tensor(64.0, dtype=torch.float64)
        out = {}
        for schedule, m in (("gpipe", 1), ("gpipe", 8), ("1f1b", 8), ("zb", 8)):
            runner = PipelineRunner(chunks, schedule, ranks, pp_rank, (1, 8, 16), torch.float32, torch.device("cpu"),
                                    contextlib.nullcontext)  # fmt: skip
            out[(schedule, m)] = _peak(runner, batches[:m], n)
            for c in chunks:
                c.zero_grad(set_to_none=True)
        return pp_rank, out
    finally:
        dims.destroy()


@pytest.mark.distributed
def test_live_activations_follow_each_schedules_bound():
    for pp_rank, peaks in run_distributed(_worker, 2, timeout=120):
        one = peaks[("gpipe", 1)]  # saved tensors of one micro-batch on this stage
        assert one > 0
        assert peaks[("gpipe", 8)] == 8 * one
        assert peaks[("1f1b", 8)] == (2 - pp_rank) * one  # pp - stage
        assert peaks[("zb", 8)] == (2 - pp_rank) * one  # B frees them; W keeps only its deferred inputs


@pytest.mark.distributed
def test_bench_pp_measures_each_schedule(capsys):
    """Every schedule has a row, ours and torch.distributed.pipelining's, with times no shorter than the busy time."""
    from benchmarks.bench_pp import main

    assert main(["--pp", "2", "--micro", "4", "--fwd-ms", "2", "--bwd-ms", "4", "--steps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if line.startswith("not run")]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["gpipe", "1f1b", "interleaved-v2", "zb", "zbv-v2"]
    busy = 4 * 6e-3
    for r in rows[:4]:  # ideal, ours, theirs, theirs/ours, bubble, their bubble, closed form
        ideal, ours, theirs, ratio, bubble, their_bubble, closed = map(float, r[1:])
        assert ours >= busy and theirs >= busy and ratio > 0
        assert bubble > closed - 0.05  # the bubble is at least the closed form's (roughly)
    assert float(rows[4][3]) >= busy  # torch's ZB-V: theirs only


def test_bench_pp_sleep_stage_defers_its_weight_gradient_under_zb():
    """The zb row measures a split backward: our runner hands the sleep stage the store, B queues W's half."""
    from benchmarks.bench_pp import SleepStage

    stage = SleepStage(0.0, 0.0)
    runner = PipelineRunner([stage], "zb", [0, 1], 0, (1, 4, 16), torch.float32, torch.device("cpu"))
    assert stage.weight_grad_store is runner.store
    with runner.store.deferring((0, 0)):
        stage(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    assert stage.w.grad is None
    assert runner.store.run((0, 0)) == 1 and stage.w.grad is not None
