"""Bad input: one line on stderr, non-zero exit, no traceback, and the run directory left as it was."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.train import main
from tests.train.conftest import tiny_args

ROOT = Path(__file__).resolve().parents[2]


def _fails(capsys, args, match):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    return err[0]


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_cli_one_line_errors_in_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for args, match in (
        (["--model.n_layer", "2"], "did you mean 'model.n_layers'"),
        (["--resume", str(tmp_path / "missing")], "does not exist"),
    ):
        proc = subprocess.run(
            [sys.executable, "examples/pretrain_gpt.py", *args, "--run.dir", str(tmp_path / "run")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and match in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_impossible_batch_and_bad_shapes(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    _fails(capsys, tiny_args(run, *tiny_data, train__global_batch=6, train__micro_batch=4), "multiple of")
    _fails(capsys, tiny_args(run, *tiny_data, model__n_heads=3), "must divide model.d_model")
    _fails(capsys, tiny_args(run, *tiny_data, model__seq_len=100000), "seq_len")
    # pipeline-only keys are refused rather than silently ignored while pipeline parallelism does not exist
    _fails(capsys, tiny_args(run, *tiny_data, parallel__virtual_stages=2), "apply to pipeline parallelism")
    _fails(capsys, tiny_args(run, *tiny_data, parallel__pp_schedule="gpipe"), "apply to pipeline parallelism")
    _fails(capsys, tiny_args(run, *tiny_data, train__max_skipped_steps=0), "train.max_skipped_steps must be >= 1")
    assert not run.exists()


def test_refusals_leave_the_run_directory_alone(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(run, *tiny_data, train__steps=3)) == 0
    capsys.readouterr()
    before = _snapshot(run)
    _fails(capsys, tiny_args(run, *tiny_data, model__d_model=64), "model.d_model: checkpoint 32, now 64")
    _fails(capsys, tiny_args(run, *tiny_data, optim__lr=1e-2), "force_resume")
    _fails(capsys, tiny_args(run, *tiny_data, resume="never"), "already holds checkpoints")
    _fails(capsys, tiny_args(run, *tiny_data, resume=str(tmp_path / "nowhere")), "does not exist")
    victim = run / "checkpoints" / "step_00000003" / "optim_r00000.pt"
    original = victim.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    line = _fails(capsys, tiny_args(run, *tiny_data), "is corrupt")
    assert str(victim) in line
    victim.write_bytes(original)
    assert _snapshot(run) == before
    # Told to, a run resumes across a changed optimizer setting (a different parallel layout needs no telling).
    assert main(tiny_args(run, *tiny_data, optim__lr=1e-2, checkpoint__force_resume="true")) == 0


def test_a_corrupt_or_partial_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_data, capsys):
    """--resume auto skips a checkpoint that fails verification, naming it, and resumes from the previous complete
    one (then saves a good copy of the skipped step over it); an explicit path to it stays an error."""
    from engine.metrics import read_metrics

    run = tmp_path / "run"
    assert main(tiny_args(run, *tiny_data, eval__every=0)) == 0  # checkpoints at steps 3 and 6
    straight = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("loss") is not None}
    capsys.readouterr()
    step6 = run / "checkpoints" / "step_00000006"
    victim = step6 / "model_r00000.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    line = _fails(capsys, tiny_args(run, *tiny_data, eval__every=0, resume=str(step6)), "is corrupt")
    assert str(victim) in line
    capsys.readouterr()
    assert main(tiny_args(run, *tiny_data, eval__every=0, train__steps=8)) == 0
    err = capsys.readouterr().err
    assert f"skipped an unusable checkpoint: checkpoint file {victim} is corrupt" in err
    assert f"resuming from the previous complete one, {run / 'checkpoints' / 'step_00000003'}" in err
    resumed = [r for r in read_metrics(run / "metrics.jsonl") if r.get("loss") is not None]
    assert [r["step"] for r in resumed[-5:]] == [4, 5, 6, 7, 8]
    assert [r["loss"] for r in resumed[-5:-2]] == [straight[s] for s in (4, 5, 6)]  # bit-identical
    # A partial checkpoint (a shard file gone) is skipped the same way; with none left, the run stops.
    (run / "checkpoints" / "step_00000008" / "optim_r00000.pt").unlink()
    for d in ("step_00000003", "step_00000006"):
        (run / "checkpoints" / d / "rank_r00000.pt").write_bytes(b"truncated")
    line = _fails(capsys, tiny_args(run, *tiny_data, eval__every=0, train__steps=9), "no usable checkpoint under")
    assert "step_00000008/optim_r00000.pt is missing" in line


def test_a_damaged_manifest_is_named_and_never_passed_over_silently(tmp_path, tiny_data, capsys):
    """A step directory whose manifest is truncated is a damaged checkpoint, not an absent one: --resume auto names it
    and resumes from the previous complete one; with none left the run stops, leaving every file as it was, rather
    than start afresh over them; the checkpoint CLI's verify fails on it."""
    from engine.checkpoint.__main__ import main as checkpoint_main

    run = tmp_path / "run"
    assert main(tiny_args(run, *tiny_data, eval__every=0)) == 0  # checkpoints at steps 3 and 6
    capsys.readouterr()
    manifest = run / "checkpoints" / "step_00000006" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:100])
    assert checkpoint_main(["verify", str(run)]) != 0
    assert f"the latest checkpoint under {run / 'checkpoints'} is damaged: checkpoint file {manifest} is corrupt" in (
        capsys.readouterr().err)  # fmt: skip
    assert checkpoint_main(["verify", str(run), "--all"]) == 1
    out = capsys.readouterr()
    assert "ok: " in out.out and "step_00000003" in out.out and f"{manifest} is corrupt" in out.err
    assert main(tiny_args(run, *tiny_data, eval__every=0, train__steps=7)) == 0
    err = capsys.readouterr().err
    assert f"skipped an unusable checkpoint: checkpoint file {manifest} is corrupt" in err
    assert f"resuming from the previous complete one, {run / 'checkpoints' / 'step_00000003'}" in err
    for m in (run / "checkpoints").glob("step_*/manifest.json"):
        m.write_bytes(b"")
    before = _snapshot(run)
    _fails(capsys, tiny_args(run, *tiny_data, eval__every=0, train__steps=9), "no usable checkpoint under")
    assert _snapshot(run) == before


@pytest.mark.parametrize("bad", ["--train.steps", "--train.steps=x"])
def test_flag_errors(bad, capsys):
    _fails(capsys, [bad], "train.steps")


def test_forced_backend_that_cannot_run_fails_before_the_run_directory(tmp_path, tiny_data, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _fails(capsys, tiny_args(run, *tiny_data, model__kernels="triton"), "model.kernels=triton on cpu needs CUDA")
    assert not run.exists()
    assert main(tiny_args(run, *tiny_data, train__steps=2)) == 0
    capsys.readouterr()
    before = _snapshot(run)
    _fails(capsys, tiny_args(run, *tiny_data, train__steps=2, model__kernels="triton"), "needs CUDA")
    assert _snapshot(run) == before


def test_a_run_without_checkpoint_is_replaced_only_by_the_same_config(tmp_path, tiny_data, capsys):
    """A run that died before its first checkpoint leaves config.toml and records: the same config starts over
    (its old records kept in metrics.superseded.jsonl), another config is refused unless forced."""
    import shutil

    from engine.metrics import SUPERSEDED_NAME, read_metrics

    run = tmp_path / "run"
    assert main(tiny_args(run, *tiny_data, train__steps=2, eval__every=0)) == 0
    shutil.rmtree(run / "checkpoints")  # as if it had crashed before checkpointing
    capsys.readouterr()
    before = _snapshot(run)
    _fails(capsys, tiny_args(run, *tiny_data, train__steps=2, model__d_model=64), "different config and no checkpoint")
    (run / "config.toml").write_text("[model\n")
    _fails(capsys, tiny_args(run, *tiny_data, train__steps=2), "config.toml is unreadable")
    (run / "config.toml").write_bytes(before["config.toml"])
    assert _snapshot(run) == before
    assert main(tiny_args(run, *tiny_data, train__steps=2, eval__every=0)) == 0
    assert [r["step"] for r in read_metrics(run / SUPERSEDED_NAME)] == [1, 2]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    shutil.rmtree(run / "checkpoints")
    # More steps with decay_steps 0 (follow train.steps) is the same run started over, not another schedule.
    assert main(tiny_args(run, *tiny_data, train__steps=3, eval__every=0, optim__decay_steps=0)) == 0
    shutil.rmtree(run / "checkpoints")
    capsys.readouterr()
    line = _fails(capsys, tiny_args(run, *tiny_data, train__steps=3, eval__every=0, optim__lr=0.5), "optim.lr")
    assert "optim.lr: config.toml 0.003, now 0.5" in line
    args = tiny_args(run, *tiny_data, train__steps=2, eval__every=0, model__d_model=64)
    assert main([*args, "--checkpoint.force_resume", "true"]) == 0
    assert [r["step"] for r in read_metrics(run / SUPERSEDED_NAME)] == [1, 2, 1, 2, 1, 2, 3]


def test_sp_without_tp_is_a_note(tmp_path, tiny_data, capsys):
    assert main(tiny_args(tmp_path / "run", *tiny_data, train__steps=1, eval__every=0, parallel__sp="true")) == 0
    assert "parallel.sp is ignored with parallel.tp 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--parallel.pp", "4", "--model.n_layers", "2"], "need at least as many layers, but model.n_layers = 2"),
        (["--parallel.pp", "2", "--parallel.pp_layers", "1,2"], "must give 2 stages"),
        (["--parallel.pp", "2", "--parallel.pp_schedule", "pipedream"], "must be one of gpipe|1f1b|interleaved|zb"),
        (["--parallel.pp", "2", "--parallel.pp_schedule", "interleaved", "--parallel.virtual_stages", "2",
          "--train.global_batch", "6", "--train.micro_batch", "2"], "needs micro-batches divisible by parallel.pp"),
    ],
)  # fmt: skip
def test_impossible_pipelines_are_one_line(flags, match, capsys):
    """Checked before any process group or model exists (here in a dry run: no peers needed)."""
    _fails(capsys, [*flags, "--train.dry_run", "true"], match)


def test_zero1_bad_input_is_one_line(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    _fails(capsys, tiny_args(run, *tiny_data, parallel__zero1="true", optim__name="adafactor"), "cannot be sharded")
    _fails(capsys, tiny_args(run, *tiny_data, parallel__bucket_mb=0), "parallel.bucket_mb must be > 0")
    _fails(capsys, tiny_args(run, *tiny_data, parallel__zero1="true", train__dtype="fp16"), "no sharded loss scaler")
    _fails(capsys, tiny_args(run, *tiny_data, train__param_dtype="bf16", train__dtype="fp16"), "choose one")
    assert not run.exists()


def test_fsdp2_bad_input_is_one_line(tmp_path, tiny_data, capsys, monkeypatch):
    run = tmp_path / "run"
    _fails(capsys, tiny_args(run, *tiny_data, parallel__dp_shard=2, parallel__pp=2, parallel__pp_schedule="zb"),
           "with the zb schedule")  # fmt: skip
    _fails(capsys, tiny_args(run, *tiny_data, parallel__dp_shard=2, parallel__zero1="true"), "choose one")
    _fails(capsys, tiny_args(run, *tiny_data, parallel__dp_shard=0), "parallel.dp_shard must be a positive integer")
    _fails(capsys, tiny_args(run, *tiny_data, parallel__dp_shard=2, train__dtype="fp16"), "no sharded loss scaler")
    monkeypatch.setenv("WORLD_SIZE", "3")  # the dry run plans for $WORLD_SIZE ranks
    _fails(capsys, ["--parallel.dp_shard", "2", "--train.dry_run", "true"], "world size 3 is not divisible")
    assert not run.exists()


def test_context_parallel_bad_input_is_one_line(tmp_path, tiny_data, capsys):
    """Refused by the config checks, before any process group (a one-process run asks for cp 2 here)."""
    run = tmp_path / "run"
    _fails(capsys, tiny_args(run, *tiny_data, parallel__cp=2, model__seq_len=30), "not divisible by 2 x parallel.cp")
    alltoall = tiny_args(run, *tiny_data, parallel__cp=4, parallel__cp_impl="alltoall", model__seq_len=32)
    _fails(capsys, alltoall, "2 heads (per tp rank) are not divisible by parallel.cp = 4")
    _fails(capsys, tiny_args(run, *tiny_data, parallel__cp=2, parallel__cp_impl="star"), "ring|alltoall")
    _fails(capsys, tiny_args(run, *tiny_data, parallel__cp=0), "parallel.cp must be a positive integer")
    _fails(capsys, tiny_args(run, *tiny_data, parallel__cp=2, model__dropout=0.1), "set model.dropout 0")
    assert not run.exists()


def test_fp8_bad_input_is_one_line(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    _fails(capsys, tiny_args(run, *tiny_data, train__fp8="delayed", parallel__pp=2, parallel__pp_schedule="zb"),
           "zb schedule")  # fmt: skip
    _fails(capsys, tiny_args(run, *tiny_data, train__fp8="delayed", model__recompute="full"), "recompute full")
    _fails(capsys, tiny_args(run, *tiny_data, train__fp8="delayed", train__fp8_amax_history=0), "must be >= 1")
    _fails(capsys, tiny_args(run, *tiny_data, train__fp8="blocks"), "train.fp8")
    _fails(capsys, tiny_args(run, *tiny_data, train__fp8="block", parallel__tp=2), "block with parallel.tp")
    assert not run.exists()


def test_window_bad_input_is_one_line(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    _fails(capsys, tiny_args(run, *tiny_data, model__window=-1), "model.window must be >= 0")
    _fails(capsys, tiny_args(run, *tiny_data, model__window=8, parallel__cp=2), "not supported yet")
    assert not run.exists()
