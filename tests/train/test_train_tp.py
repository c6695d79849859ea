"""The training loop under tensor and sequence parallelism (`--parallel.tp`, `--parallel.sp`), with dp on top.

Contract 1 at the trainer level: tp=2, tp=2 + sp and tp=2 x dp=2 (with gradient accumulation) give the one-process
losses, gradient norms (clipping active) and validation losses. Contract 3 in tp=2 + sp with dropout on (default
and per-tp-rank streams restored). Each tp rank checkpoints its own shards, and the manifest assembles them into the
one-process tensors; resuming into another tp reshards; layouts the model cannot split are refused in one line.
A vocabulary tp does not divide (a padding row on the last tp rank, never saved) trains and resumes the same.
"""

import json

import pytest
import torch
import torch.distributed as dist

from engine.checkpoint.reader import load_checkpoint
from engine.config import load_config
from engine.metrics import read_metrics
from engine.train import main, train
from engine.training.precision import agree_found_inf
from tests.distributed import run_distributed
from tests.train.conftest import tiny_args

# 4 heads over 2 kv heads (split at tp=2); clip 0.5 sits below every step's norm, so the global norm steers the steps.
SHAPE = dict(model__d_model=64, model__n_heads=4, model__n_kv_heads=2, optim__clip=0.5)
LAYOUT = dict(SHAPE, train__steps=10, optim__decay_steps=10, eval__every=5, eval__batches=1, checkpoint__every=10)
RESUME = dict(SHAPE, model__dropout=0.1, train__steps=6, checkpoint__every=3, eval__every=0)
# A vocabulary tp 2 does not divide (the byte tokenizer has 375 ids): 385 rows split 193 + 192, so tp rank 1's
# embedding (and output layer, and their optimizer state) holds one padding row, zero and never saved.
ODD_VOCAB = dict(SHAPE, model__vocab_size=385, train__steps=4, optim__decay_steps=4, eval__every=0, checkpoint__every=2)


def _cfg(run_dir, data, **kw):
    return load_config(tiny_args(run_dir, *data, **kw))


def _records(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > 0}


def _tp2_worker(rank, world, root, data):
    from pathlib import Path

    root = Path(root)
    out = {}
    for name, sp in (("tp2", "false"), ("tp2sp", "true")):
        res = train(_cfg(root / name, data, parallel__tp=2, parallel__sp=sp, **LAYOUT))
        out[name] = (res.losses, res.val_losses)
    straight = train(_cfg(root / "straight", data, parallel__tp=2, parallel__sp="true", **RESUME)).losses
    train(_cfg(root / "split", data, parallel__tp=2, parallel__sp="true", **{**RESUME, "train__steps": 3}))
    resumed = train(_cfg(root / "split", data, parallel__tp=2, parallel__sp="true", **RESUME))
    out["resume"] = (straight, resumed.start_step, resumed.losses)
    # fp16 under tp: an overflow on one rank skips the step on all (the CPU scaler stands in for CUDA's).
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    if rank == 1:
        model.weight.grad[0, 0] = float("inf")
    before = model.bias.detach().clone()
    scaler.unscale_(opt)
    agree_found_inf(scaler, opt, dist.group.WORLD)
    scaler.step(opt)
    scaler.update()
    out["fp16"] = (torch.equal(before, model.bias.detach()), scaler.get_scale())
    return out


def _tp2dp2_worker(rank, world, root, data):
    from pathlib import Path

    res = train(_cfg(Path(root) / "tp2dp2", data, parallel__tp=2, train__micro_batch=1, **LAYOUT))
    return res.losses, res.val_losses


def _odd_vocab_worker(rank, world, root, data):
    from pathlib import Path

    root = Path(root)
    straight = train(_cfg(root / "tp2", data, parallel__tp=2, **ODD_VOCAB)).losses
    train(_cfg(root / "split", data, parallel__tp=2, **{**ODD_VOCAB, "train__steps": 2}))
    resumed = train(_cfg(root / "split", data, parallel__tp=2, **ODD_VOCAB))
    return straight, resumed.start_step, resumed.losses


@pytest.mark.distributed
def test_tp_with_a_vocabulary_tp_does_not_divide_trains_like_one_process_and_resumes_exactly(tmp_path, tiny_data):
    single = train(_cfg(tmp_path / "single", tiny_data, **ODD_VOCAB))
    out = run_distributed(_odd_vocab_worker, 2, str(tmp_path), tiny_data, timeout=120)
    assert out[1] == out[0]
    straight, start, resumed = out[0]
    for s in range(1, 5):
        assert straight[s] == pytest.approx(single.losses[s], rel=1e-5, abs=0), s
    assert start == 2 and [resumed[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]
    # Rank 1 wrote its 192 real rows (not the padding row) at row 193; assembled, the one-process tensors.
    ckpt = tmp_path / "tp2" / "checkpoints" / "step_00000004"
    tensors = json.loads((ckpt / "manifest.json").read_text())["tensors"]
    vocab = {
        k: [(sh["offsets"], sh["shape"]) for sh in e["shards"]] for k, e in tensors.items() if e["shape"][:1] == [385]
    }
    assert vocab and all(v == [([0, 0], [193, 64]), ([193, 0], [192, 64])] for v in vocab.values()), vocab
    assert any(k.startswith("optim.") for k in vocab)
    sharded = load_checkpoint(ckpt).tensors
    full = load_checkpoint(tmp_path / "single" / "checkpoints" / "step_00000004").tensors
    for group in ("model", "optim"):
        assert sharded[group].keys() == full[group].keys()
    # Values of the vocabulary tensors (the others are compared in the test below, over 10 steps: here, after 4, Adam's
    # near-zero gradients still amplify summation-order differences, one down_proj element by 1.4e-5).
    for k in vocab:
        group = "optim" if k.startswith("optim.") else "model"
        torch.testing.assert_close(sharded[group][k], full[group][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.distributed
def test_tp_sp_and_tp_x_dp_train_like_one_process_and_resume_exactly(tmp_path, tiny_data, capsys):
    single = train(_cfg(tmp_path / "single", tiny_data, **LAYOUT))
    two = run_distributed(_tp2_worker, 2, str(tmp_path), tiny_data, timeout=180)
    four = run_distributed(_tp2dp2_worker, 4, str(tmp_path), tiny_data, timeout=180)
    assert two[1] == two[0] and all(f == four[0] for f in four)  # every rank logs the same reduced losses
    ref = _records(tmp_path / "single")
    assert min(r["grad_norm"] for r in ref.values()) > 0.5  # clipping acts on every step
    assert ref[10]["loss"] < ref[1]["loss"] - 1.0  # it trains
    runs = {"tp2": two[0]["tp2"], "tp2sp": two[0]["tp2sp"], "tp2dp2": four[0]}
    for name, (losses, val_losses) in runs.items():
        assert sorted(losses) == list(range(1, 11)) and sorted(val_losses) == [0, 5, 10], name
        for s in range(1, 11):
            assert losses[s] == pytest.approx(single.losses[s], rel=1e-5, abs=0), (name, s)
            assert _records(tmp_path / name)[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (name, s)
        for s, v in val_losses.items():
            assert v == pytest.approx(single.val_losses[s], rel=1e-5, abs=0), (name, s)

    # Resume exactness in tp=2 + sp with dropout: the default and the per-tp-rank streams come back too.
    straight, start, resumed = two[0]["resume"]
    assert start == 3 and [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]
    assert two[0]["fp16"] == (True, 128.0) and two[1]["fp16"] == (True, 128.0)

    # Each tp rank wrote its shards; assembled, they are the one-process tensors (same names, shapes, values).
    ckpt = tmp_path / "tp2" / "checkpoints" / "step_00000010"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["layout"]["tp"] == 2 and manifest["layout"]["sp"] is False and manifest["layout"]["dp"] == 1
    assert {"model_r00000.pt", "model_r00001.pt", "optim_r00001.pt", "rank_r00001.pt"} <= set(manifest["files"])
    assert len(manifest["tensors"]["layers.0.mlp.down_proj.weight"]["shards"]) == 2
    sharded = load_checkpoint(ckpt).tensors
    full = load_checkpoint(tmp_path / "single" / "checkpoints" / "step_00000010").tensors
    for group in ("model", "optim"):
        assert sharded[group].keys() == full[group].keys()
        for k, v in full[group].items():
            torch.testing.assert_close(sharded[group][k], v, rtol=1e-4, atol=1e-5, msg=k)
    dp_ckpt = tmp_path / "tp2dp2" / "checkpoints" / "step_00000010"
    dp_manifest = json.loads((dp_ckpt / "manifest.json").read_text())
    assert dp_manifest["layout"]["dp"] == 2 and "model_r00002.pt" not in dp_manifest["files"]  # dp rank 0 writes

    # Random streams: the default one equal over the tp ranks of a dp rank (replicated regions draw the same masks)
    # and different between dp ranks; the tp stream different on every rank (ranks 0, 1: tp; 0, 2: dp).
    rng = [torch.load(dp_ckpt / f"rank_r{r:05d}.pt", weights_only=True) for r in range(4)]
    assert torch.equal(rng[0]["rng"]["torch"], rng[1]["rng"]["torch"])
    assert not torch.equal(rng[0]["rng"]["torch"], rng[2]["rng"]["torch"])
    tp_streams = [r["rng_tracker"][0]["tp"][0] for r in rng]
    assert all(not torch.equal(tp_streams[i], tp_streams[j]) for i in range(4) for j in range(i))

    # Resuming into another tp (here one process) reshards, and goes on as the one-process run goes on.
    cont = train(_cfg(tmp_path / "tp2", tiny_data, **{**LAYOUT, "train__steps": 12}))
    more = train(_cfg(tmp_path / "single", tiny_data, **{**LAYOUT, "train__steps": 12}))
    assert cont.start_step == 10 and sorted(cont.losses) == [11, 12]
    for s in (11, 12):
        assert cont.losses[s] == pytest.approx(more.losses[s], rel=1e-5, abs=0), s


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(parallel__tp=2), "world size 1 is not divisible by tp*pp*cp*dp_shard"),
        (dict(parallel__tp=4, model__d_model=64, model__n_heads=2), "n_heads = 2 is not divisible by parallel.tp = 4"),
        (dict(parallel__tp=2, parallel__sp="true", model__seq_len=33), "seq_len = 33 is not divisible"),
        (dict(parallel__tp=0), "parallel.tp must be a positive integer"),
        (dict(parallel__tp=2, optim__name="adafactor"), "adafactor does not support parallel.tp > 1"),
    ],
)
def test_bad_tp_layouts_are_one_line_errors(tmp_path, tiny_data, capsys, kw, needle):
    assert main(tiny_args(tmp_path / "run", *tiny_data, **kw)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "run").exists()
    assert not dist.is_initialized()  # a refused layout leaves no process group behind
