"""The decoder-only objectives under pipeline parallelism (`--parallel.pp 2`): fim, mlm (`causal=False` on every
stage), prefix (each row's `prefix_lengths` on every stage) and mtp (the prediction modules on the last stage, which
holds a copy of the embedding for the sequential kind and gets the token ids) give the one-process training losses,
gradient norms and validation losses (fp32, the tolerance of tests/train/test_train_pp.py), under 1f1b and other
schedules: interleaved (two chunks per rank), zb (deferred weight gradients) and gpipe."""

from pathlib import Path

import pytest

from engine.config import load_config
from engine.train import train
from tests.distributed import run_distributed
from tests.train.conftest import tiny_args
from tests.train.test_train_pp import _close

# Two micro-batches per step (global batch 4 at micro-batch 2): the loss is normalised over the whole step's targets.
BASE = dict(train__micro_batch=2, checkpoint__every=0, optim__clip=0.5)
# Prefixes of a quarter to three quarters of the sequence: every row mixes bidirectional and causal attention. Four
# layers, as the prefix mask changes only the prefix's own outputs (a query after the prefix sees what a causal one
# does): a stage must hold a layer before the last for a missing prefix to change the loss.
PREFIX = dict(objective__prefix_min_frac=0.25, objective__prefix_max_frac=0.75, model__n_layers=4)
# Two sequential modules, each reading the embedding of a later token: the last stage's copy of the embedding must
# equal the first stage's and receive its part of the gradient (tied to the output head, and untied).
MTP = dict(objective__mtp_depth=2, objective__mtp_lambda=0.5)
GPIPE = dict(parallel__pp_schedule="gpipe")
INTERLEAVED = dict(parallel__pp_schedule="interleaved", parallel__virtual_stages=2)
CASES = {  # label: (objective, its flags (the one-process reference runs them too), pipeline flags)
    "fim 1f1b": ("fim", {}, {}),
    "mlm 1f1b": ("mlm", {}, {}),
    "prefix 1f1b": ("prefix", PREFIX, {}),
    "prefix interleaved": ("prefix", PREFIX, INTERLEAVED),
    "mtp sequential 1f1b": ("mtp", MTP, {}),
    "mtp sequential untied gpipe": ("mtp", dict(MTP, model__tie_embeddings="false"), GPIPE),
    "mtp sequential interleaved": ("mtp", dict(MTP, model__n_layers=4), INTERLEAVED),
    "mtp parallel zb": ("mtp", dict(MTP, objective__mtp_kind="parallel"), dict(parallel__pp_schedule="zb")),
}


def _key(objective, flags):
    return objective, tuple(sorted(flags.items()))


def _run(run_dir, data, objective, **kw):
    """(losses, gradient norms, validation losses) by step of a tiny run of `objective`."""
    flags = {**BASE, **kw}
    result = train(load_config(tiny_args(run_dir, *data, train__objective=objective, **flags)))
    return result.losses, result.grad_norms, result.val_losses


def _pp_worker(rank, world, root, data):
    import torch.distributed as dist

    out = {}
    for i, (label, (objective, flags, pipeline)) in enumerate(CASES.items()):
        out[label] = _run(Path(root) / f"pp2_{i}", data, objective, parallel__pp=2, **flags, **pipeline)
        dist.barrier()
    return out


@pytest.mark.distributed
def test_decoder_only_objectives_at_pp2_give_the_one_process_losses(tmp_path, tiny_data):
    got = run_distributed(_pp_worker, 2, str(tmp_path), tiny_data, timeout=240)
    refs = {}
    for objective, flags, _ in CASES.values():
        if _key(objective, flags) not in refs:
            refs[_key(objective, flags)] = _run(tmp_path / f"one_{len(refs)}", tiny_data, objective, **flags)
    for label, (objective, flags, _) in CASES.items():
        for m, what in enumerate(("loss", "grad norm", "val loss")):
            ref = refs[_key(objective, flags)][m]
            assert ref, (label, what)
            for rank in (0, 1):
                _close(got[rank][label][m], ref, f"{label} {what} rank {rank}")


UNTIED = dict(MTP, model__tie_embeddings="false")


def _four_rank_worker(rank, world, root, data):
    import torch.distributed as dist

    tp_pp = _run(Path(root) / "tp2pp2", data, "mtp", parallel__tp=2, parallel__pp=2, checkpoint__every=3, **MTP)
    dist.barrier()
    fsdp_pp = _run(Path(root) / "fsdp2pp2", data, "mtp", parallel__dp_shard=2, parallel__pp=2, **UNTIED)
    dist.barrier()
    sp_pp = _run(Path(root) / "sp2pp2", data, "mtp", parallel__tp=2, parallel__sp="true", parallel__pp=2, **MTP)
    dist.barrier()
    cp_pp = _run(Path(root) / "cp2pp2", data, "mtp", parallel__cp=2, parallel__pp=2, **MTP)
    return tp_pp, fsdp_pp, sp_pp, cp_pp


@pytest.mark.distributed
def test_mtp_with_pp2_and_tp_fsdp2_sp_or_cp_gives_the_one_process_losses_and_resumes(tmp_path, tiny_data):
    """Tensor parallelism converts the last stage's embedding copy before the output head tied to it (one vocab-split
    parameter); FSDP2 shards the untied copy like any parameter of the stage; with sequence parallelism the copy
    reduce-scatters the shifted embeddings to the stage's sequence shard; with context parallelism every stage gets
    the depths' ids and labels, shifted before the cut, and the last one reads them. The tp 2 x pp 2 checkpoint holds
    the embedding once, under its own name, and resumes without pipelining."""
    got = run_distributed(_four_rank_worker, 4, str(tmp_path), tiny_data, timeout=300)
    ref = _run(tmp_path / "one", tiny_data, "mtp", **MTP)
    ref_untied = _run(tmp_path / "one_untied", tiny_data, "mtp", **UNTIED)
    step3 = tmp_path / "tp2pp2" / "checkpoints" / "step_00000003"
    resumed = _run(tmp_path / "resumed", tiny_data, "mtp", resume=str(step3), **MTP)
    for m, what in enumerate(("loss", "grad norm", "val loss")):
        assert ref[m] and ref_untied[m], what
        for rank in range(4):
            for layout, want in ((0, ref[m]), (1, ref_untied[m]), (2, ref[m]), (3, ref[m])):
                _close(got[rank][layout][m], want, f"{what} rank {rank} layout {layout}")
        after = {s: v for s, v in ref[m].items() if s > 3}
        assert after, what
        _close(resumed[m], after, f"resumed {what}")
