"""The training loop under context parallelism (`--parallel.cp`, ring and all-to-all), composed with tp (+sp), dp
(+ZeRO-1), FSDP2 and pipeline parallelism, with and without document masking, through the user's entry point
(examples/pretrain_gpt.py) for 6 steps: the one-process losses, gradient norms and validation losses to 1e-5
(metrics.jsonl), and a bit-identical resume at cp 2. The document data packs several short documents (each ending in
EOD) into every sample."""

from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.train.test_train_pp import HALF, _check, _run

DOCS = dict(data__document_mask="true", data__reset_positions="true")


def _refs(root, data, docs):
    kws = {"plain": {}, "docs": DOCS, "gpt2 docs": dict(model__arch="gpt2", **DOCS)}
    return {k: _run(Path(root) / f"one_{i}", data, **kws[k]) for i, k in enumerate(("plain", "docs", "gpt2 docs"))
            if docs or k == "plain"}  # fmt: skip


CP2 = {  # label: (one-process reference, flags)
    "cp2 ring": ("plain", dict(parallel__cp=2)),
    "cp2 ring docs": ("docs", dict(parallel__cp=2, **DOCS)),
    "cp2 alltoall": ("plain", dict(parallel__cp=2, parallel__cp_impl="alltoall")),
    "cp2 alltoall docs": ("docs", dict(parallel__cp=2, parallel__cp_impl="alltoall", **DOCS)),
    "cp2 gpt2 docs": ("gpt2 docs", dict(parallel__cp=2, model__arch="gpt2", **DOCS)),
}


def _cp2_worker(rank, world, root, data):
    root = Path(root)
    out = {k: (ref, _run(root / f"r{i}", data, **kw)) for i, (k, (ref, kw)) in enumerate(CP2.items())}
    # Stop at step HALF, resume to STEPS: bit-identical to the straight run of the same layout.
    _run(root / "split", data, parallel__cp=2, train__steps=HALF, **DOCS)
    out["resumed"] = _run(root / "split", data, parallel__cp=2, **DOCS)
    return out


@pytest.mark.distributed
def test_context_parallel_trains_like_one_process_and_resumes_exactly(tmp_path, document_data):
    results = run_distributed(_cp2_worker, 2, str(tmp_path), document_data, timeout=600)
    refs = _refs(tmp_path, document_data, docs=True)
    assert refs["docs"][0] != refs["plain"][0]  # the masks change the model's losses: they are really applied
    for r in results:
        resumed, straight = r.pop("resumed"), r["cp2 ring docs"][1]
        assert resumed[0] == straight[0] and resumed[1] == straight[1]  # bit-identical after the resume
    _check(results, refs)


CP_4RANKS = {
    "cp4 ring docs": ("docs", dict(parallel__cp=4, **DOCS)),
    "cp2 x tp2 sp": ("plain", dict(parallel__cp=2, parallel__tp=2, parallel__sp="true")),
    "cp2 x tp2 docs": ("docs", dict(parallel__cp=2, parallel__tp=2, **DOCS)),
    "cp2 x dp2 zero1": ("plain", dict(parallel__cp=2, parallel__zero1="true")),
    "cp2 x dp_shard2 docs": ("docs", dict(parallel__cp=2, parallel__dp_shard=2, **DOCS)),
    "cp2 x pp2 docs": ("docs", dict(parallel__cp=2, parallel__pp=2, train__micro_batch=2, **DOCS)),
    "cp2 x pp2 zb alltoall": ("plain", dict(parallel__cp=2, parallel__pp=2, parallel__pp_schedule="zb",
                                            parallel__cp_impl="alltoall")),  # fmt: skip
}


def _cp_4rank_worker(rank, world, root, data):
    return {k: (ref, _run(Path(root) / f"r{i}", data, **kw)) for i, (k, (ref, kw)) in enumerate(CP_4RANKS.items())}


@pytest.mark.distributed
def test_context_parallel_with_tp_and_dp(tmp_path, document_data):
    results = run_distributed(_cp_4rank_worker, 4, str(tmp_path), document_data, timeout=600)
    _check(results, _refs(tmp_path, document_data, docs=True))


def test_documents_and_the_sequence_layout():
    """Documents end at (and include) each EOD; positions restart after it; cp cuts every tensor into its zigzag
    chunks, positions those of the whole sequence."""
    import torch

    from engine.training.samples import SequenceLayout, collate, documents

    x = torch.tensor([[5, 0, 7, 8, 0, 0, 9, 4]])
    seg, pos = documents(x, eod_id=0)
    assert seg.tolist() == [[0, 0, 1, 1, 1, 2, 3, 3]]
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0, 0, 1]]
    ds = [{"tokens": list(range(1, 10))}, {"tokens": [3, 0, 3, 3, 0, 3, 3, 3, 3]}]
    assert len(collate(ds, [0, 1], torch.device("cpu"), SequenceLayout())) == 2  # plain: (inputs, labels)
    x, y, kw = collate(ds, [0, 1], torch.device("cpu"), SequenceLayout(0, True, True, cp=2, cp_rank=1))
    assert x.tolist() == [[3, 4, 5, 6], [3, 3, 0, 3]] and y.tolist() == [[4, 5, 6, 7], [3, 0, 3, 3]]
    assert kw["segment_ids"].tolist() == [[0, 0, 0, 0], [1, 1, 1, 2]]
    assert kw["positions"].tolist() == [[2, 3, 4, 5], [0, 1, 2, 0]]
    _, _, kw = collate(ds, [0], torch.device("cpu"), SequenceLayout(cp=2, cp_rank=0))
    assert set(kw) == {"positions"} and kw["positions"].tolist() == [[0, 1, 6, 7]]
