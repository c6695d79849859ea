"""ZeRO-1 (`--parallel.zero1 true`) through the example's entry for 6 steps: the one-process losses and gradient norms
to 1e-5 at dp 2 and dp 4 (with gradient accumulation), composed with tp and pp, a bit-identical resume; the overlap
of the bucketed reduce-scatter with backward; and each rank's bytes against the closed form."""

import pytest
import torch

from tests.distributed import run_distributed
from tests.train.test_train_pp import HALF, _check, _close, _refs, _run

TINY_BUCKET = 0.002  # MiB: several buckets even in the tiny model, so overlap and bucket edges are exercised


def tiny_chunk(n_layers: int = 3, zero1: bool = False, dp_shard: int = 1):
    """(chunk, dims, optimizer): a tiny llama parallelized over this spawned rank's world, and its optimizer."""
    from engine.config import Config, ModelConfig
    from engine.model.gpt import GPT
    from engine.optim.distributed import build_training_optimizer
    from engine.parallel.dims import ParallelDims
    from engine.parallel.parallelize import parallelize_gpt

    cfg = Config(model=ModelConfig(n_layers=n_layers, d_model=32, n_heads=4, vocab_size=64, seq_len=8, kernels="torch"))
    cfg.parallel.zero1, cfg.parallel.bucket_mb, cfg.parallel.dp_shard = zero1, TINY_BUCKET, dp_shard
    dims = ParallelDims.from_world(dp_shard=dp_shard)
    with torch.device("meta"):
        model = GPT(cfg.model)
    [chunk] = parallelize_gpt(model, dims, cfg, device="cpu")
    return chunk, dims, build_training_optimizer(chunk, cfg.optim)


class _GatherOnWait:
    """An all-gather that happens only when waited for: a parameter read before its wait sees stale shards."""

    def __init__(self, real, out, inp, group):
        self.real, self.args = real, (out, inp.clone(), group)

    def wait(self):
        out, inp, group = self.args
        self.real(out, inp, group=group)


def _dp2_worker(rank, world, root, data):
    from pathlib import Path

    import engine.parallel.data_parallel as dp

    root = Path(root)
    kw = dict(parallel__zero1="true", parallel__bucket_mb=TINY_BUCKET)
    out = {"dp2 zero1": ("llama4", _run(root / "a", data, **kw))}
    real = dp._all_gather
    dp._all_gather = lambda o, i, group, async_op=False: (
        _GatherOnWait(real, o, i, group) if async_op else real(o, i, group)
    )
    out["dp2 zero1, gathers done at their wait"] = ("llama4", _run(root / "w", data, **kw))
    dp._all_gather = real
    _run(root / "split", data, train__steps=HALF, **kw)  # stop at step HALF, resume to STEPS
    out["resumed"] = _run(root / "split", data, **kw)
    _run(root / "other_dp", data, train__steps=HALF, **kw)  # resumed by one process after the spawn
    return out


@pytest.mark.distributed
def test_zero1_trains_like_one_process_and_resumes_exactly(tmp_path, tiny_data):
    results = run_distributed(_dp2_worker, 2, str(tmp_path), tiny_data, timeout=300)
    for r in results:
        resumed, straight = r.pop("resumed"), r["dp2 zero1"][1]
        assert resumed[0] == straight[0]  # bit-identical after the resume
    _check(results, _refs(tmp_path, tiny_data, ("llama4",)))
    # The checkpoint holds each parameter's whole optimizer state: one process (dp 1, no ZeRO-1) resumes it.
    other = _run(tmp_path / "other_dp", tiny_data)
    straight = results[0]["dp2 zero1"][1]
    _close(other[0], straight[0], "one process resuming the dp 2 ZeRO-1 checkpoint")


ZERO1_4RANKS = {
    "dp4 zero1 accumulation": dict(train__micro_batch=1),  # 2 micro-batches per rank
    "dp2 x tp2 sp zero1": dict(parallel__tp=2, parallel__sp="true"),
    "dp2 x pp2 zero1 interleaved": dict(
        parallel__pp=2, parallel__virtual_stages=2, parallel__pp_schedule="interleaved", train__micro_batch=2
    ),
    "dp2 x pp2 zero1 zb": dict(parallel__pp=2, parallel__pp_schedule="zb", train__micro_batch=1),
}


def _dp4_worker(rank, world, root, data):
    from pathlib import Path

    kw = dict(parallel__zero1="true", parallel__bucket_mb=TINY_BUCKET)
    out = {k: ("llama4", _run(Path(root) / f"r{i}", data, **kw, **v)) for i, (k, v) in enumerate(ZERO1_4RANKS.items())}
    out["dp4 (DDP)"] = ("llama4", _run(Path(root) / "ddp", data, train__micro_batch=2))
    return out


@pytest.mark.distributed
def test_zero1_composes_with_accumulation_tp_and_pp(tmp_path, tiny_data):
    results = run_distributed(_dp4_worker, 4, str(tmp_path), tiny_data, timeout=300)
    _check(results, _refs(tmp_path, tiny_data, ("llama4",)))


def _overlap_and_bytes_worker(rank, world):
    import torch.distributed as dist

    from engine.parallel.data_parallel import grad_buffers_of

    chunk, dims, opt = tiny_chunk(zero1=True)
    buffers = grad_buffers_of(chunk)
    n_params = len({id(p) for p in chunk.parameters()})
    buffers.trace = []
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    buffers.sync = False  # an accumulation micro-batch: no collective at all
    chunk(x, x, reduction="sum").backward()
    accumulation_trace = list(buffers.trace)
    buffers.sync = True
    chunk(x, x, reduction="sum").backward()
    last_trace = list(buffers.trace)
    buffers.finish()
    opt.step()
    buffers.gather_trace = []  # the step left its parameter all-gathers in flight: the next forward waits for them
    chunk(x, x, reduction="sum")
    gathers_waited = list(buffers.gather_trace)
    psi = sum(p.numel() for p in {id(p): p for p in chunk.parameters()}.values())
    total, padding = buffers.numel()
    out = {
        "accumulation": accumulation_trace,
        "last": last_trace,
        "n_params": n_params,
        "n_buckets": len(buffers.buckets),
        "psi": psi,
        "buffer_elements": total,
        "padding": padding,
        "state_bytes": opt.state_bytes(),
        "world": dist.get_world_size(),
        "gathers_waited": gathers_waited,
    }
    dims.destroy()
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_bucket_collectives_overlap_backward_and_bytes_follow_the_closed_form(world):
    """The first bucket's reduce-scatter starts while backward still has gradients to produce, and an accumulation
    micro-batch starts none. Bytes per rank: parameters and gradients 4 each per element (fp32, plus the padding of
    each bucket to a multiple of dp), AdamW's two moments 8 per element of this rank's shard: 8 / dp per element."""
    results = run_distributed(_overlap_and_bytes_worker, world, timeout=120)
    for r in results:
        assert r["accumulation"] == []
        assert r["n_buckets"] >= 3 and len(r["last"]) == r["n_buckets"]  # each bucket launched once, in backward
        first_bucket, grads_seen = r["last"][0]
        assert first_bucket == 0 and grads_seen < r["n_params"]  # launched before backward's last gradient
        assert r["buffer_elements"] == r["psi"] + r["padding"] and r["padding"] < world * r["n_buckets"]
        # each bucket's all-gather waited for once, by the forward, in forward's order (the embedding's bucket first)
        assert sorted(r["gathers_waited"]) == list(range(r["n_buckets"]))
        assert r["gathers_waited"][0] == r["n_buckets"] - 1
    states = [r["state_bytes"] for r in results]
    psi = results[0]["psi"]
    assert sum(states) == 8 * psi  # every element's two moments on exactly one rank
    assert max(states) <= 8 * (psi + results[0]["padding"]) / world


FOUR_D = {
    "dp2 x tp2 x pp2": dict(parallel__tp=2, parallel__pp=2, train__micro_batch=1),
    "dp2 x tp2 + sp x pp2 zero1 zb": dict(parallel__tp=2, parallel__sp="true", parallel__pp=2, parallel__zero1="true",
                                          parallel__pp_schedule="zb", train__micro_batch=1),
    "dp_shard2 x tp2 x pp2 (FSDP2)": dict(parallel__dp_shard=2, parallel__tp=2, parallel__pp=2, train__micro_batch=1),
}  # fmt: skip


def _four_d_worker(rank, world, root, data):
    from pathlib import Path

    return {k: ("llama4", _run(Path(root) / f"r{i}", data, **v)) for i, (k, v) in enumerate(FOUR_D.items())}


@pytest.mark.slow
@pytest.mark.distributed
def test_dp_tp_pp_on_eight_processes(tmp_path, tiny_data):
    """dp 2 x tp 2 x pp 2 (8 ranks), plain, with ZeRO-1 and with FSDP2, equals one process to 1e-5 for 6 steps."""
    results = run_distributed(_four_d_worker, 8, str(tmp_path), tiny_data, timeout=600)
    _check(results, _refs(tmp_path, tiny_data, ("llama4",)))


def _bf16_worker(rank, world, root, data):
    from pathlib import Path

    root = Path(root)
    kw = dict(parallel__zero1="true", parallel__bucket_mb=TINY_BUCKET, train__param_dtype="bf16")
    out = {"dp2 zero1 bf16 params": _run(root / "a", data, **kw)}
    _run(root / "split", data, train__steps=HALF, **kw)  # stop at HALF, resume to STEPS: the fp32 masters return
    out["resumed"] = _run(root / "split", data, **kw)
    return out


@pytest.mark.distributed
def test_zero1_with_bf16_parameters_and_fp32_masters(tmp_path, tiny_data):
    """bf16 parameters, fp32 gradients and master weights in the shards: one process with bf16 parameters to 1e-3
    (bf16 rounding of the parameters and activations), a bit-identical resume (the masters are checkpointed)."""
    results = run_distributed(_bf16_worker, 2, str(tmp_path), tiny_data, timeout=300)
    ref = _run(tmp_path / "one", tiny_data, train__param_dtype="bf16")
    for r in results:
        got = r["dp2 zero1 bf16 params"]
        _close(got[0], ref[0], "dp2 zero1 bf16 params", rtol=1e-3)
        assert r["resumed"][0] == got[0]  # bit-identical after the resume


def _two_steps_and_leak_worker(rank, world):
    import gc
    import weakref

    import engine.parallel.data_parallel as dp
    from engine.parallel.data_parallel import grad_buffers_of

    real = dp._all_gather
    dp._all_gather = lambda o, i, group, async_op=False: (
        _GatherOnWait(real, o, i, group) if async_op else real(o, i, group)
    )
    chunk, dims, opt = tiny_chunk(n_layers=2, zero1=True)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    chunk(x, x, reduction="sum").backward()
    grad_buffers_of(chunk).finish()
    opt.step()  # its gathers stay in flight (they happen at their wait)
    mine = [pc.view.clone() for pc in opt.pieces]  # this rank's shards after the first step
    opt.step()  # no forward in between: the first step's gathers must land before the second updates the shards
    grad_buffers_of(chunk).wait_params()
    moved = all(not torch.equal(a, pc.view) for a, pc in zip(mine, opt.pieces))
    dp._all_gather = real
    alive = weakref.ref(next(chunk.parameters()))
    del chunk, opt
    gc.collect()
    dims.destroy()
    return moved, alive() is None


@pytest.mark.distributed
def test_steps_without_a_forward_between_and_no_leak():
    """Each step's update survives the previous step's parameter all-gathers even when no forward waited for them,
    and a ZeRO-1 model is freed once dropped (the gradient hooks hold no strong reference to it)."""
    for moved, freed in run_distributed(_two_steps_and_leak_worker, 2, timeout=120):
        assert moved and freed


BF16_4RANKS = {
    "dp2 x tp2 + sp zero1 bf16 params": dict(parallel__tp=2, parallel__sp="true"),
    "dp2 x pp2 zb zero1 bf16 params": dict(parallel__pp=2, parallel__pp_schedule="zb", train__micro_batch=1),
}


def _bf16_4rank_worker(rank, world, root, data):
    from pathlib import Path

    kw = dict(parallel__zero1="true", parallel__bucket_mb=TINY_BUCKET, train__param_dtype="bf16")
    return {k: _run(Path(root) / f"r{i}", data, **kw, **v) for i, (k, v) in enumerate(BF16_4RANKS.items())}


@pytest.mark.distributed
def test_bf16_parameters_with_tp_and_pp(tmp_path, tiny_data):
    """bf16 parameters whose fp32 gradients are summed over tp (sequence-parallel norms) and over the tied embedding's
    two pipeline stages, with zero-bubble's deferred weight gradients folded in: one process with bf16 parameters
    to 1e-3 (observed: within 7e-5 over 10 steps)."""
    results = run_distributed(_bf16_4rank_worker, 4, str(tmp_path), tiny_data, timeout=300)
    ref = _run(tmp_path / "one", tiny_data, train__param_dtype="bf16")
    for r in results:
        for label, got in r.items():
            _close(got[0], ref[0], label, rtol=1e-3)


def _bf16_reduce_worker(rank, world, root, data):
    from pathlib import Path

    from engine.parallel.comm_count import count_collectives
    from engine.parallel.data_parallel import grad_buffers_of

    root = Path(root)
    layouts = {
        "dp2 DDP": {},
        "dp2 zero1": dict(parallel__zero1="true", parallel__bucket_mb=TINY_BUCKET),
        "dp_shard 2": dict(parallel__dp_shard=2),
    }
    out = {}
    for i, (label, kw) in enumerate(layouts.items()):  # (bf16 reduction, the same layout's fp32 reduction)
        out[label] = (
            _run(root / f"b{i}", data, **kw, parallel__grad_reduce_dtype="bf16"),
            _run(root / f"f{i}", data, **kw),
        )
    chunk, dims, _ = tiny_chunk(zero1=True)
    buffers = grad_buffers_of(chunk)
    buffers.reduce_dtype = torch.bfloat16
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    with count_collectives() as counter:
        chunk(x, x, reduction="sum").backward()
        buffers.finish()
    out["bytes"] = (counter.payload_bytes("reduce_scatter"), buffers.numel()[0])
    dims.destroy()
    return out


@pytest.mark.distributed
def test_bf16_gradient_reduction_on_request(tmp_path, tiny_data):
    """--parallel.grad_reduce_dtype bf16 (DDP's hook, ZeRO-1's buckets, FSDP2's policy): half the bytes on the wire,
    one process's losses to 1e-3, and not the fp32 reduction's (bf16 rounding shows)."""
    results = run_distributed(_bf16_reduce_worker, 2, str(tmp_path), tiny_data, timeout=300)
    ref = _run(tmp_path / "one", tiny_data)
    for r in results:
        payload, elements = r.pop("bytes")
        assert payload == 2 * elements  # bf16: 2 bytes an element
        for label, (got, fp32) in r.items():
            _close(got[0], ref[0], label, rtol=1e-3)
            assert got[0] != fp32[0], label


def _bf16_reduce_pp_worker(rank, world, root, data):
    from pathlib import Path

    kw = dict(parallel__pp=2, train__micro_batch=2)
    bf16 = _run(Path(root) / "b", data, **kw, parallel__grad_reduce_dtype="bf16")
    return bf16, _run(Path(root) / "f", data, **kw)


@pytest.mark.distributed
def test_bf16_gradient_reduction_under_pipeline_parallelism(tmp_path, tiny_data):
    """pp 2 x dp 2 without ZeRO-1: the pipeline step's dp all-reduce in bf16."""
    results = run_distributed(_bf16_reduce_pp_worker, 4, str(tmp_path), tiny_data, timeout=300)
    ref = _run(tmp_path / "one", tiny_data)
    for got, fp32 in results:
        _close(got[0], ref[0], "pp 2 x dp 2 bf16 reduction", rtol=1e-3)
        assert got[0] != fp32[0]
