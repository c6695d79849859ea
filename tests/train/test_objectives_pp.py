"""The decoder-only objectives under pipeline parallelism (`--parallel.pp 2`): fim, mlm (`causal=False` on every
stage) and prefix (each row's `prefix_lengths` on every stage) give the one-process training losses, gradient norms
and validation losses (fp32, the tolerance of tests/train/test_train_pp.py), under 1f1b and, for prefix, the
interleaved schedule (two chunks per rank)."""

import pytest

from engine.config import load_config
from engine.train import train
from tests.distributed import run_distributed
from tests.train.conftest import tiny_args

# Two micro-batches per step (global batch 4 at micro-batch 2): the loss is normalised over the whole step's targets.
BASE = dict(train__micro_batch=2, checkpoint__every=0, optim__clip=0.5)
PP_CASES = {  # label: (objective, pipeline flags)
    "fim 1f1b": ("fim", {}),
    "mlm 1f1b": ("mlm", {}),
    "prefix 1f1b": ("prefix", {}),
    "prefix interleaved": ("prefix", dict(parallel__pp_schedule="interleaved", parallel__virtual_stages=2)),
}
# Prefixes of a quarter to three quarters of the sequence: every row mixes bidirectional and causal attention. Four
# layers, as the prefix mask changes only the prefix's own outputs (a query after the prefix sees what a causal one
# does): a stage must hold a layer before the last for a missing prefix to change the loss.
OBJECTIVE_FLAGS = {
    "prefix": dict(objective__prefix_min_frac=0.25, objective__prefix_max_frac=0.75, model__n_layers=4),
}


def _run(run_dir, data, objective, **kw):
    """(losses, gradient norms, validation losses) by step of a tiny run of `objective`."""
    flags = {**BASE, **OBJECTIVE_FLAGS.get(objective, {}), **kw}
    result = train(load_config(tiny_args(run_dir, *data, train__objective=objective, **flags)))
    return result.losses, result.grad_norms, result.val_losses


def _pp_worker(rank, world, root, data):
    from pathlib import Path

    import torch.distributed as dist

    out = {}
    for i, (label, (objective, kw)) in enumerate(PP_CASES.items()):
        out[label] = _run(Path(root) / f"pp2_{i}", data, objective, parallel__pp=2, **kw)
        dist.barrier()
    return out


@pytest.mark.distributed
def test_decoder_only_objectives_at_pp2_give_the_one_process_losses(tmp_path, tiny_data):
    got = run_distributed(_pp_worker, 2, str(tmp_path), tiny_data, timeout=180)
    refs = {o: _run(tmp_path / f"one_{o}", tiny_data, o) for o in sorted({o for o, _ in PP_CASES.values()})}
    for label, (objective, _) in PP_CASES.items():
        for m, what in enumerate(("loss", "grad norm", "val loss")):
            ref = refs[objective][m]
            assert ref, (label, what)
            for rank in (0, 1):
                values = got[rank][label][m]
                assert sorted(values) == sorted(ref), (label, what, rank)
                for s, want in ref.items():
                    assert values[s] == pytest.approx(want, rel=1e-5, abs=0), (label, what, rank, s, values, ref)
