"""`python -m engine.checkpoint inspect|verify|consolidate`: on small hand-made checkpoints (one with a tensor in two
shards) and once on a real tiny training run, whose consolidated weights load into the model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint.__main__ import main
from engine.checkpoint.checkpointer import MANIFEST, save_checkpoint, sha256_file

REPO = Path(__file__).resolve().parents[2]
LAYOUT = {"world_size": 2, "dp": 2, "tp": 1, "pp": 1, "cp": 1, "dp_shard": 1, "sp": False, "virtual_stages": 1}
CONFIG = {"model": {"arch": "llama", "n_layers": 1, "d_model": 4, "n_heads": 2, "vocab_size": 6}}


def _model(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {
        "tok_emb.weight": torch.randn(6, 4, generator=g),
        "norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "counts": torch.arange(3, dtype=torch.int64),
    }


@pytest.fixture
def run(tmp_path):
    """A run directory with complete checkpoints at steps 2 and 4 (`latest` names step 4)."""
    for step in (2, 4):
        save_checkpoint(
            tmp_path / "checkpoints", step,
            tensors={"model": _model(step), "optim": {"optim.tok_emb.weight.exp_avg": torch.zeros(6, 4)}},
            objects={}, rank_objects={},
            meta={"consumed_samples": 8 * step, "layout": LAYOUT, "config": CONFIG},
        )  # fmt: skip
    return tmp_path


@pytest.fixture
def sharded(tmp_path):
    """A step directory whose tensor `w` (6, 4) lies in two shard files (rows 0-1 and 2-5), `b` whole in the first."""
    d = tmp_path / "sharded" / "step_00000005"
    d.mkdir(parents=True)
    w, b = torch.randn(6, 4), torch.randn(3, dtype=torch.float16)
    parts = {"model_r00000.pt": {"w": w[:2].clone(), "b": b}, "model_r00001.pt": {"w": w[2:].clone()}}
    for name, tensors in parts.items():
        torch.save(tensors, d / name)
    shards = [{"file": "model_r00000.pt", "offsets": [0, 0], "shape": [2, 4]},
              {"file": "model_r00001.pt", "offsets": [2, 0], "shape": [4, 4]}]  # fmt: skip
    manifest = {
        "format": 1, "step": 5, "consumed_samples": 40, "layout": LAYOUT, "config": CONFIG,
        "tensors": {
            "w": {"group": "model", "shape": [6, 4], "dtype": "float32", "shards": shards},
            "b": {"group": "model", "shape": [3], "dtype": "float16",
                  "shards": [{"file": "model_r00000.pt", "offsets": [0], "shape": [3]}]},
        },
        "files": {n: {"sha256": sha256_file(d / n), "bytes": (d / n).stat().st_size} for n in parts},
    }  # fmt: skip
    (d / MANIFEST).write_text(json.dumps(manifest))
    return d, {"w": w, "b": b}


def _flip(path: Path, at: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_inspect_text_json_and_listing(run, capsys):
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {run / 'checkpoints' / 'step_00000004'}" in out
    assert "step: 4  consumed samples: 32" in out
    assert "layout: world_size=2 dp=2 tp=1 pp=1 cp=1 dp_shard=1 sp=False virtual_stages=1" in out
    assert "model: arch=llama n_layers=1 d_model=4 n_heads=2 vocab_size=6" in out
    assert "group model: 3 tensors, 31 elements, 128 bytes" in out  # 24 fp32 + 4 bf16 + 3 int64
    assert "group optim: 1 tensors, 24 elements, 96 bytes" in out
    assert "  model_r00000.pt  " in out and "counts" not in out  # files; no tensors without --tensors
    assert "latest names step_00000004" in out
    assert f"step 2  {run / 'checkpoints' / 'step_00000002'}\n" in out
    assert f"step 4  {run / 'checkpoints' / 'step_00000004'}  <- latest" in out

    assert main(["inspect", str(run / "checkpoints" / "step_00000002"), "--tensors", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["step"] == 2 and s["consumed_samples"] == 16 and s["layout"] == LAYOUT and "checkpoints" not in s
    assert s["model"] == CONFIG["model"]
    assert s["groups"]["model"] == {"tensors": 3, "elements": 31, "bytes": 128}
    assert {t["name"]: (t["shape"], t["dtype"], t["shards"]) for t in s["tensors"] if t["group"] == "model"} == {
        "tok_emb.weight": ([6, 4], "float32", 1), "norm.weight": ([4], "bfloat16", 1), "counts": ([3], "int64", 1),
    }  # fmt: skip
    assert set(s["files"]) == {"model_r00000.pt", "optim_r00000.pt", "objects.pt", "rank_r00000.pt"}

    assert main(["inspect", str(run / "checkpoints"), "--json"]) == 0  # a checkpoints root lists too
    s = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in s["checkpoints"]] == [2, 4] and s["latest"] == "step_00000004" and s["step"] == 4


def test_inspect_counts_shards(sharded, capsys):
    d, _ = sharded
    assert main(["inspect", str(d), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "  w  model  [6, 4]  float32  2 shard(s)" in out and "  b  model  [3]  float16  1 shard(s)" in out


def test_verify_ok_corrupt_file_and_bad_tiling(run, sharded, capsys):
    d, _ = sharded
    assert main(["verify", str(d)]) == 0
    files = sum((d / n).stat().st_size for n in ("model_r00000.pt", "model_r00001.pt"))
    assert capsys.readouterr().out == f"ok: {d} (2 files, {files:,} bytes verified)\n"

    assert main(["verify", str(run), "--all"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in out] == [f"ok: {run / 'checkpoints' / f'step_0000000{s}'}" for s in (2, 4)]

    _flip(run / "checkpoints" / "step_00000002" / "model_r00000.pt")
    assert main(["verify", str(run)]) == 0  # the latest (step 4) is intact
    capsys.readouterr()
    assert main(["verify", str(run / "checkpoints" / "step_00000002")]) == 1
    err = _one_error_line(capsys.readouterr().err)
    assert "step_00000002/model_r00000.pt is corrupt" in err
    assert main(["verify", str(run), "--all"]) == 1  # each reported: step 2 bad, step 4 ok
    cap = capsys.readouterr()
    assert "step_00000002/model_r00000.pt is corrupt" in _one_error_line(cap.err)
    assert cap.out.startswith(f"ok: {run / 'checkpoints' / 'step_00000004'} (")

    manifest = json.loads((d / MANIFEST).read_text())  # shards that leave a gap: checksums pass, tiling fails
    manifest["tensors"]["w"]["shards"][1]["offsets"] = [3, 0]
    manifest["tensors"]["w"]["shards"][1]["shape"] = [3, 4]
    (d / MANIFEST).write_text(json.dumps(manifest))
    assert main(["verify", str(d)]) == 1
    assert "checkpoint tensor w" in _one_error_line(capsys.readouterr().err)


def test_usage_errors(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    assert main(["inspect", str(tmp_path)]) == 2  # an empty directory
    assert "no complete checkpoint" in _one_error_line(capsys.readouterr().err)
    assert main(["consolidate", str(tmp_path), "--out", str(tmp_path / "x.safetensors"), "--dtype", "int8"]) == 2
    assert "invalid choice: 'int8'" in _one_error_line(capsys.readouterr().err)


def test_consolidate_sharded_fp32_and_bf16(sharded, tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    d, full = sharded
    out = tmp_path / "m.safetensors"
    assert main(["consolidate", str(d), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = st.load_file(out)
    assert set(loaded) == {"w", "b"} and loaded["b"].dtype == torch.float16
    assert all(torch.equal(loaded[k], full[k]) for k in full)
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and len(raw) == 8 + n + full["w"].nbytes + full["b"].nbytes
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    assert meta["step"] == "5" and meta["arch"] == "llama" and json.loads(meta["config"]) == CONFIG

    out16 = tmp_path / "m16.safetensors"
    assert main(["consolidate", str(d), "--out", str(out16), "--dtype", "bf16"]) == 0
    loaded = st.load_file(out16)
    assert all(loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], full[k].to(torch.bfloat16)) for k in full)


def test_consolidate_keeps_integers_refuses_overwrite_and_verifies(run, tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    out = tmp_path / "m.safetensors"
    assert main(["consolidate", str(run), "--out", str(out), "--dtype", "fp16"]) == 0
    loaded = st.load_file(out)
    want = _model(4)
    assert loaded["counts"].dtype == torch.int64 and torch.equal(loaded["counts"], want["counts"])
    assert loaded["tok_emb.weight"].dtype == torch.float16 and "optim.tok_emb.weight.exp_avg" not in loaded
    assert torch.equal(loaded["norm.weight"], want["norm.weight"].to(torch.float16))
    capsys.readouterr()

    before = out.read_bytes()
    assert main(["consolidate", str(run), "--out", str(out)]) == 2
    assert "exists (--force overwrites it)" in _one_error_line(capsys.readouterr().err)
    assert out.read_bytes() == before
    assert main(["consolidate", str(run), "--out", str(out), "--force"]) == 0
    assert st.load_file(out)["tok_emb.weight"].dtype == torch.float32
    capsys.readouterr()

    _flip(run / "checkpoints" / "step_00000004" / "model_r00000.pt")
    bad = tmp_path / "bad.safetensors"
    assert main(["consolidate", str(run), "--out", str(bad)]) == 1
    assert "model_r00000.pt is corrupt" in _one_error_line(capsys.readouterr().err)
    (run / "checkpoints" / "step_00000004" / "model_r00000.pt").unlink()  # fails mid-write without the checksums
    assert main(["consolidate", str(run), "--out", str(bad), "--no-verify"]) == 1
    assert "model_r00000.pt is missing" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name) == ["m.safetensors"]  # no temp left


@pytest.fixture
def trained(tmp_path, monkeypatch):
    from engine.train import main as train_main
    from tests.train.conftest import build_tiny_data, tiny_args

    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    run_dir = tmp_path / "run"
    assert train_main(tiny_args(run_dir, *build_tiny_data(data))) == 0
    return run_dir


def test_real_run_consolidates_into_the_model(trained, tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    from engine.checkpoint.reader import CheckpointReader
    from engine.config import ModelConfig
    from engine.model.gpt import GPT

    proc = subprocess.run(
        [sys.executable, "-m", "engine.checkpoint", "inspect", str(trained)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "step: 6  consumed samples: 24" in proc.stdout and "layout: world_size=1 dp=1 tp=1" in proc.stdout
    assert "step 3  " in proc.stdout and "<- latest" in proc.stdout

    assert main(["verify", str(trained), "--all"]) == 0
    out = tmp_path / "model.safetensors"
    assert main(["consolidate", str(trained), "--out", str(out)]) == 0
    loaded = st.load_file(out)
    reader = CheckpointReader(trained / "checkpoints" / "step_00000006")
    cfg = reader.manifest["config"]["model"]
    model = GPT(ModelConfig(**cfg), seed=0)
    params = dict(model.named_parameters())
    assert {k: tuple(v.shape) for k, v in loaded.items()} == {k: tuple(p.shape) for k, p in params.items()}
    result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(model.tied_aliases)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), reader.read(name)), name
    assert torch.isfinite(model(torch.randint(0, 256, (1, 8)))).all()
    reader.close()
