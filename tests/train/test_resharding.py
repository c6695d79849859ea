"""Resharding: a checkpoint saved at one parallel layout resumes at another, model and optimizer state both, and the
resumed losses equal the straight run's (DESIGN contract 3: to 1e-5 relative).

Saved at tp 2 x pp 2 (a tied GPT-2: the last stage's copy of the embedding is not saved), resumed at dp 4, tp 4, pp
4, dp_shard 2 x tp 2 (FSDP2), dp 4 with ZeRO-1, cp 2 x dp 2 and in one process, each by `--resume PATH` into a run
directory of its own; then back into tp 2 x pp 2 from the dp_shard 2 x tp 2 checkpoint (FSDP2 shards) and from the
ZeRO-1 one (flat pieces of the optimizer state, written by every dp rank).
"""

import json
from pathlib import Path

import pytest

from engine.train import main
from tests.distributed import run_distributed
from tests.train.conftest import tiny_args

BASE = dict(model__arch="gpt2", model__n_layers=4, model__n_heads=4, train__steps=6, optim__decay_steps=6,
            train__global_batch=8, train__micro_batch=1, eval__every=0, checkpoint__every=3,
            optim__clip=0.5)  # fmt: skip
TARGETS = {
    "dp4": {},
    "tp4": dict(parallel__tp=4),
    "pp4": dict(parallel__pp=4),
    "fsdp2_tp2": dict(parallel__dp_shard=2, parallel__tp=2),
    "zero1_dp4": dict(parallel__zero1="true"),
    "cp2_dp2": dict(parallel__cp=2),
}


def _losses(run_dir) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r.get("loss") is not None}


def _run(run_dir, data, **kw) -> dict[int, float]:
    import torch.distributed as dist

    assert main(tiny_args(run_dir, *data, **{**BASE, **kw})) == 0
    if dist.is_initialized():
        dist.barrier()
    return _losses(run_dir)


def _worker(rank, world, root, data):
    root = Path(root)
    out = {"straight": _run(root / "tp2pp2", data, parallel__tp=2, parallel__pp=2)}
    step3 = str(root / "tp2pp2" / "checkpoints" / "step_00000003")
    for name, kw in TARGETS.items():
        out[name] = _run(root / name, data, resume=step3, **kw)
    back = str(root / "fsdp2_tp2" / "checkpoints" / "step_00000006")  # and back, from FSDP2 shards to pipeline stages
    out["back"] = _run(root / "back", data, resume=back, train__steps=8, parallel__tp=2, parallel__pp=2)
    flat = str(root / "zero1_dp4" / "checkpoints" / "step_00000006")  # ZeRO-1's flat pieces into tp x pp
    out["back_zero1"] = _run(root / "back_zero1", data, resume=flat, train__steps=8, parallel__tp=2, parallel__pp=2)
    return out


@pytest.mark.distributed
def test_a_checkpoint_resumes_into_any_layout_with_the_straight_losses(tmp_path, tiny_data, capfd):
    out = run_distributed(_worker, 4, str(tmp_path), tiny_data, timeout=300)[0]
    straight = out["straight"]
    assert sorted(straight) == list(range(1, 7))
    for name in TARGETS:
        resumed = out[name]
        assert sorted(resumed) == [4, 5, 6], name
        for s in (4, 5, 6):
            assert resumed[s] == pytest.approx(straight[s], rel=1e-5, abs=0), (name, s, resumed, straight)
    assert "resharding step_00000003 from world_size=4 dp=1 tp=2 sp=False pp=2" in capfd.readouterr().err
    # FSDP2 x tp wrote sharded: each of the 4 ranks its quarter (tp half, FSDP2 half of it) of a projection.
    manifest = json.loads((tmp_path / "fsdp2_tp2" / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    shards = manifest["tensors"]["layers.0.attn.q_proj.weight"]["shards"]
    assert sorted((s["file"], s["offsets"][0], s["shape"][0]) for s in shards) == [
        ("model_r00000.pt", 0, 8), ("model_r00001.pt", 16, 8), ("model_r00002.pt", 8, 8), ("model_r00003.pt", 24, 8)
    ]
    # One process from the tp 2 x pp 2 checkpoint; then the back-and-forth run goes on past the straight run's end
    # (steps 7, 8 at the schedule's floor), as one process goes on from its own resumed run.
    single = _run(tmp_path / "single", tiny_data, resume=str(tmp_path / "tp2pp2" / "checkpoints" / "step_00000003"))
    assert [single[s] == pytest.approx(straight[s], rel=1e-5, abs=0) for s in (4, 5, 6)] == [True] * 3
    assert sorted(out["back"]) == [7, 8]
    more = _run(tmp_path / "single_more", tiny_data, train__steps=8,
                resume=str(tmp_path / "single" / "checkpoints" / "step_00000006"))  # fmt: skip
    for s in (7, 8):
        assert out["back"][s] == pytest.approx(more[s], rel=1e-5, abs=0), (s, out["back"], more)
        assert out["back_zero1"][s] == pytest.approx(more[s], rel=1e-5, abs=0), (s, out["back_zero1"], more)
    # ZeRO-1 wrote sharded too: each dp rank the flat pieces of AdamW's state it holds (no gather on rank 0).
    manifest = json.loads((tmp_path / "zero1_dp4" / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    moments = [e["shards"] for k, e in manifest["tensors"].items() if k.endswith(("exp_avg", "exp_avg_sq"))]
    assert all("flat" in p for pieces in moments for p in pieces)
    assert {p["file"] for pieces in moments for p in pieces} == {f"optim_r{r:05d}.pt" for r in range(4)}
    split = [pieces for pieces in moments if len({p["file"] for p in pieces}) > 1]  # a tensor across two ranks
    assert any(p["flat"][0] % p["shape"][-1] for pieces in split for p in pieces)  # split inside a row, even
