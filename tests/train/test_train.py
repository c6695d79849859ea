"""The training loop end to end on a tiny model: metrics, run directory, checkpoints, resume exactness."""

import json
from pathlib import Path

import pytest

from engine.config import load_config
from engine.metrics import read_metrics
from engine.train import train
from tests.distributed import run_distributed
from tests.train.conftest import tiny_args

FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gb")


def _train(run_dir, data, **overrides):
    return train(load_config(tiny_args(run_dir, *data, **overrides)))


def test_metrics_config_and_retention(tmp_path, tiny_data, engine_cache):
    run = tmp_path / "run"
    res = _train(run, tiny_data, checkpoint__every=1, checkpoint__keep=2)
    # The index arrays of both splits and the vocabulary scan are cached under $ENGINE_CACHE for later runs.
    cache = Path(engine_cache) / "indices"
    for pattern in ("gpt-*-train-description.json", "gpt-*-valid-description.json", "tokens-*.json"):
        assert list(cache.glob(pattern)), pattern
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(0, 7))  # step 0: the validation loss before training
    for r in recs[1:]:
        assert all(k in r for k in FIELDS)
        assert r["mfu"] is None  # no peak FLOP/s on CPU
        assert r["loss"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens"] == r["step"] * 4 * 32 and r["mem_gb"] > 0
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 3, 6]
    assert recs[-1]["val_ppl"] == pytest.approx(2.718281828 ** recs[-1]["val_loss"])
    assert res.val_losses[6] < res.val_losses[0]
    assert load_config(["--config", str(run / "config.toml")]).model.vocab_size % 64 == 0
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000005", "step_00000006"]
    manifest = json.loads((run / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    assert manifest["consumed_samples"] == 24 and manifest["layout"]["world_size"] == 1
    assert manifest["config"]["optim"]["decay_steps"] == 6


def _straight_and_resumed(root, data, crash_records=False, **kw):
    """Losses of 6 straight steps, and of 3 steps + resume to 6 (train.steps raised on resume)."""
    straight = _train(root / "straight", data, **kw).losses
    _train(root / "split", data, train__steps=3, **kw)
    if crash_records:  # a crashed run logged steps past its last checkpoint, and a torn last line
        with open(root / "split" / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n" + '{"step": 5, "lo')
    resumed = _train(root / "split", data, **kw)
    assert resumed.start_step == 3
    return straight, resumed.losses


def test_resume_is_bit_identical_one_process(tmp_path, tiny_data):
    straight, resumed = _straight_and_resumed(tmp_path, tiny_data, crash_records=True)
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert steps == list(range(0, 7))  # appended, each step once: the crashed run's step 4 was dropped


def test_resume_with_dropout_restores_the_random_streams(tmp_path, tiny_data):
    """Dropout on: the resumed steps draw the masks the straight run drew (the RNG states are restored), bit for
    bit; a resume that reseeded instead would give other losses."""
    straight, resumed = _straight_and_resumed(tmp_path, tiny_data, model__dropout=0.2, eval__every=0)
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]


def _two_rank_resume(rank, world_size, root, data):
    from pathlib import Path

    straight, resumed = _straight_and_resumed(Path(root), data)
    return straight, resumed


@pytest.mark.distributed
def test_resume_is_bit_identical_two_processes_and_reshards(tmp_path, tiny_data):
    results = run_distributed(_two_rank_resume, 2, str(tmp_path), tiny_data, timeout=120)
    straight, resumed = results[0]
    assert results[1] == results[0]  # every rank logs the same all-reduced loss
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]
    # The same config in one process sees the same data and trains the same model (contract 1, to 1e-5).
    single = _train(tmp_path / "single", tiny_data).losses
    for s in range(1, 7):
        assert single[s] == pytest.approx(straight[s], rel=1e-5)
    # A 2-process checkpoint resumes in 1 process (a different layout is not a different config).
    res = _train(tmp_path / "split", tiny_data, train__steps=8, optim__decay_steps=6)
    assert res.start_step == 6 and set(res.losses) == {7, 8}


def test_grad_accumulation_and_bf16_autocast(tmp_path, tiny_data):
    # clip 100: no clipping, so a wrongly scaled gradient changes the losses, not only the norms
    base_run = _train(tmp_path / "a", tiny_data, train__steps=3, eval__every=0, optim__clip=100)
    accum_run = _train(tmp_path / "b", tiny_data, train__steps=3, eval__every=0, train__micro_batch=1, optim__clip=100)
    base, accum = base_run.losses, accum_run.losses
    for s in base:  # 4 micro steps of 1 sequence = 1 of 4, up to summation order: losses and gradient norms
        assert accum[s] == pytest.approx(base[s], rel=1e-5)
        assert accum_run.grad_norms[s] == pytest.approx(base_run.grad_norms[s], rel=1e-5)
    bf16 = _train(tmp_path / "c", tiny_data, train__steps=3, eval__every=0, train__dtype="bf16").losses
    for s in base:  # bf16 autocast over fp32 master weights stays close to fp32
        assert bf16[s] == pytest.approx(base[s], rel=2e-2)


def _nan_loss_at(monkeypatch, steps):
    """Makes the model's loss NaN on the forward passes of the given 1-based training steps (one micro-batch each)."""
    from engine.model import head

    real, calls = head.ops.linear_cross_entropy, {"n": 0}

    def patched(*args, **kwargs):
        loss = real(*args, **kwargs)
        if not __import__("torch").is_grad_enabled():  # evaluation
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] in steps else loss

    monkeypatch.setattr(head.ops, "linear_cross_entropy", patched)


def test_non_finite_gradient_skips_the_step(tmp_path, tiny_data, monkeypatch):
    """A NaN gradient at step 3 skips that update on every rank (weights unchanged, counted in metrics) and training
    goes on; the checkpoints hold finite weights."""
    import torch

    from engine.checkpoint.reader import load_checkpoint

    _nan_loss_at(monkeypatch, {3})
    res = _train(tmp_path / "nan", tiny_data, eval__every=0)
    assert res.skipped_steps == [3] and res.end_step == 6
    recs = {r["step"]: r for r in read_metrics(tmp_path / "nan" / "metrics.jsonl")}
    assert recs[3]["skipped"] is True and recs[3]["skipped_total"] == 1 and recs[4]["skipped"] is False
    assert all(torch.isfinite(torch.tensor(res.losses[s])) for s in (4, 5, 6))
    ck = load_checkpoint(tmp_path / "nan" / "checkpoints" / "step_00000006")
    assert all(torch.isfinite(t).all() for t in ck.tensors["model"].values())


def test_consecutive_non_finite_steps_stop_the_run(tmp_path, tiny_data, monkeypatch):
    from engine.training.validate import TrainError

    _nan_loss_at(monkeypatch, {4, 5})
    with pytest.raises(TrainError, match=r"2 consecutive steps \(up to step 5\) had a non-finite gradient norm"):
        _train(tmp_path / "stop", tiny_data, eval__every=0, train__max_skipped_steps=2)
    # the last good checkpoint (step 3) is kept and still loads
    from engine.checkpoint.checkpointer import latest_checkpoint

    assert latest_checkpoint(tmp_path / "stop" / "checkpoints").name == "step_00000003"


def test_blended_stream_draws_whole_epochs(tiny_data):
    from engine.training.samples import SampleStream

    train_prefix, valid_prefix = tiny_data
    stream = SampleStream(f"0.7 {train_prefix} 0.3 {valid_prefix}", 32, 1, 256)
    n = stream.epoch_len
    assert 700 < n < 800  # bounded by the small component: ~240 samples at a 0.3 share, less the blend margin
    seen = [stream[k]["dataset_id"] for k in range(n + 2)]  # no component runs out, and epoch 1 starts
    assert abs(seen[:n].count(1) / n - 0.3) < 0.01


def test_extending_train_steps_keeps_the_schedule(tmp_path, tiny_data, capsys):
    """optim.decay_steps 0 follows train.steps; a resume that raises train.steps keeps the checkpoint's schedule, so
    the extended run equals a straight one with that decay length, bit for bit (docs/contracts.md, resume exactness)."""
    short = _train(tmp_path / "ext", tiny_data, train__steps=3, optim__decay_steps=0, eval__every=0)
    assert short.end_step == 3
    capsys.readouterr()
    extended = _train(tmp_path / "ext", tiny_data, train__steps=5, optim__decay_steps=0, eval__every=0)
    assert "keeping the checkpoint's schedule (optim.decay_steps 3" in capsys.readouterr().err
    straight = _train(tmp_path / "straight", tiny_data, train__steps=5, optim__decay_steps=3, eval__every=0)
    assert extended.start_step == 3 and [extended.losses[s] for s in (4, 5)] == [straight.losses[s] for s in (4, 5)]
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "ext" / "metrics.jsonl")}
    assert lrs == {r["step"]: r["lr"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")}
    assert load_config(["--config", str(tmp_path / "ext" / "config.toml")]).optim.decay_steps == 3


def test_triton_kernels_train_like_torch(tmp_path, tiny_data):
    """The model trains through the loop with --model.kernels triton (the Triton interpreter on CPU) with the
    torch backend's fp32 losses to 1e-5 (issue 5's acceptance)."""
    kw = dict(train__steps=3, eval__every=0, train__global_batch=2, model__seq_len=16, checkpoint__every=0)
    torch_run = _train(tmp_path / "torch", tiny_data, model__kernels="torch", **kw).losses
    triton_run = _train(tmp_path / "triton", tiny_data, model__kernels="triton", **kw).losses
    assert set(triton_run) == {1, 2, 3}
    for s in torch_run:
        assert triton_run[s] == pytest.approx(torch_run[s], rel=1e-5)
    assert torch_run[3] < torch_run[1]
