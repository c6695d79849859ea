"""Sequence-parallel mappings, and a decoder block / tiny GPT built from the tp layers against their unsharded twins,
with and without sequence parallelism, at tp=4 and at tp=2 x dp=2 (one 4-process world)."""

import pytest
import torch
import torch.distributed as dist

from benchmarks.bench_tp import ParallelBlock, ParallelGPT, ReferenceBlock
from engine.parallel import state
from engine.parallel.sequence import (
    ShapeError,
    all_gather,
    allreduce_sequence_parallel_grads,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    split,
)
from engine.parallel.tensor import gather_full
from tests.distributed import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)


def _close(a, b, what, rtol=TOL["rtol"], atol=TOL["atol"]):
    # Not torch.testing.assert_close: its first call costs seconds of imports in every spawned process.
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    err = (a.double() - b.double()).abs()
    bad = err > atol + rtol * b.double().abs()
    assert not bad.any(), f"{what}: {int(bad.sum())}/{a.numel()} elements differ, max abs error {err.max().item():.3g}"


def _check_mappings(group, tp):
    rank = dist.get_rank(group)
    gen = torch.Generator().manual_seed(0)
    for dim in (1, 0):
        full = torch.randn(4, 8, 3, generator=gen)  # both dims divisible by tp = 2 and 4
        dy = torch.randn(4, 8, 3, generator=gen)
        n = full.shape[dim] // tp
        mine = full.narrow(dim, rank * n, n)
        # scatter: forward keeps my slice, backward all-gathers.
        x = full.clone().requires_grad_()
        y = scatter_to_sequence_parallel_region(x, group, seq_dim=dim)
        assert torch.equal(y, mine)
        y.backward(dy.narrow(dim, rank * n, n))
        assert torch.equal(x.grad, dy)
        # gather: forward all-gathers; backward reduce-scatters (tp_output_grad) or splits.
        for tp_grad in (True, False):
            x = mine.clone().requires_grad_()
            y = gather_from_sequence_parallel_region(x, group, seq_dim=dim, tp_output_grad=tp_grad)
            assert torch.equal(y, full)
            y.backward(dy * (rank + 1))  # a different upstream gradient on every rank
            expected = dy.narrow(dim, rank * n, n) * (tp * (tp + 1) / 2 if tp_grad else rank + 1)
            _close(x.grad, expected, f"gather backward (tp_output_grad={tp_grad})")
        # reduce-scatter: forward sums and keeps my slice; backward all-gathers.
        x = (full * (rank + 1)).requires_grad_()
        y = reduce_scatter_to_sequence_parallel_region(x, group, seq_dim=dim)
        _close(y, mine * tp * (tp + 1) / 2, "reduce-scatter forward")
        y.backward(dy.narrow(dim, rank * n, n))
        _close(x.grad, dy, "reduce-scatter backward")
    try:
        split(torch.zeros(2, tp + 1), 1, group)
    except ShapeError as e:
        return str(e)


def _check_block(group, tp, sp):
    torch.manual_seed(20)
    block = ParallelBlock(16, 4, 32, sequence_parallel=sp, group=group)
    torch.manual_seed(20)
    ref = ReferenceBlock(16, 4, 32)
    for name, p in ref.named_parameters():
        assert torch.equal(gather_full(dict(block.named_parameters())[name], group), p), f"init of {name}"
    gen = torch.Generator().manual_seed(21)
    x, dy = torch.randn(2, 8, 16, generator=gen), torch.randn(2, 8, 16, generator=gen)
    x_par, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    h = scatter_to_sequence_parallel_region(x_par, group) if sp else x_par
    y = block(h)
    assert y.shape == (2, 8 // tp if sp else 8, 16)
    if sp:
        y = gather_from_sequence_parallel_region(y, group, tp_output_grad=False)
    (y * dy).sum().backward()
    reduced = allreduce_sequence_parallel_grads(block, group)
    assert reduced == (4 if sp else 0)  # 2 norm weights + 2 row-parallel biases
    y_ref = ref(x_ref)
    (y_ref * dy).sum().backward()
    _close(y, y_ref, f"block output (sp={sp})")
    _close(x_par.grad, x_ref.grad, f"block input grad (sp={sp})")
    params = dict(block.named_parameters())
    for name, p in ref.named_parameters():
        q = params[name]
        grad = q.grad if getattr(q, "partition_dim", None) is None else all_gather(q.grad, q.partition_dim, group)
        _close(grad, p.grad, f"grad of {name} (sp={sp})")


def _check_gpt_steps(group, single, tp, sp, twin_losses):
    """10 SGD steps of the tiny GPT (odd vocab, tied vocab-parallel head) on tp x dp (dp = 4 / tp; each dp rank takes
    its slice of the batch, gradients averaged over dp) give the one-process twin's losses (DESIGN contract 1)."""
    gen = torch.Generator().manual_seed(30)
    tokens = torch.randint(0, 13, (10, 4, 9), generator=gen)
    dp_group, dp, dp_rank = state.get_dp_group(), state.get_dp_world_size(), state.get_dp_rank()
    runs = [(group, sp, dp_group, dp, dp_rank)]
    if not twin_losses:  # the twin depends on nothing above: train it once per process
        runs.append((single, False, None, 1, 0))
    for g, use_sp, dpg, n_dp, r_dp in runs:
        torch.manual_seed(31)
        model = ParallelGPT(13, 16, 4, 32, 2, sequence_parallel=use_sp, group=g)
        run = []
        for step in range(10):
            batch = tokens[step].chunk(n_dp)[r_dp]
            loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            allreduce_sequence_parallel_grads(model, g)
            mean_loss = loss.detach().clone()
            if n_dp > 1:  # equal token counts per dp rank: the mean of the means is the global mean
                dist.all_reduce(mean_loss, group=dpg)
                mean_loss /= n_dp
            with torch.no_grad():  # plain SGD (torch.optim's first step imports torch._dynamo: seconds per process)
                for p in model.parameters():
                    if n_dp > 1:
                        dist.all_reduce(p.grad, group=dpg)
                        p.grad /= n_dp
                    p -= 0.5 * p.grad
                    p.grad = None
            run.append(mean_loss.item())
        if g is single:
            twin_losses.extend(run)
        else:
            losses = run
    assert losses[0] > losses[-1] + 0.1  # it trains
    _close(torch.tensor(losses), torch.tensor(twin_losses), f"losses per step (tp={tp}, dp={dp}, sp={sp})", atol=0)
    return losses


def _sequence_worker(rank, world):
    single, _ = dist.new_subgroups(group_size=1)  # the unsharded twin's "tp group"
    out, twin_losses = {}, []
    for tp in (4, 2):
        state.initialize(tp=tp)
        try:
            group = state.get_tp_group()
            out[tp] = {"split_error": _check_mappings(group, tp)}
            for sp in (False, True):
                _check_block(group, tp, sp)
                out[tp][f"losses_sp{sp}"] = _check_gpt_steps(group, single, tp, sp, twin_losses)
        finally:
            state.destroy()
    return out


@pytest.mark.distributed
def test_sequence_parallel_block_and_model_match_unsharded():
    results = run_distributed(_sequence_worker, 4, timeout=240)
    for by_tp in results:
        for tp, res in by_tp.items():
            assert res["split_error"] == f"dimension 1 of size {tp + 1} is not divisible by the group size {tp}"
            # with and without sp, every layout trains the same model to the same losses
            torch.testing.assert_close(torch.tensor(res["losses_spTrue"]), torch.tensor(res["losses_spFalse"]))
