"""engine.checkpoint.save / load for other trainers: a plain module, DDP and FSDP2, across layouts, sync and async."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from engine.checkpoint import AsyncSaver, CheckpointError, has_checkpoint, load, save
from tests.distributed import run_distributed


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 3))


def _step(model, opt, g):
    loss = model(torch.randn(8, 6, generator=g)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [_step(model, opt, g) for _ in range(steps)]


def test_the_ten_line_loop_resumes_exactly(tmp_path):
    """The docstring's loop: save every 2 steps, stop, load into fresh objects, go on: the straight run's losses."""
    model, opt = _model(), None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    straight = _train(model, opt, 6)

    model, saver = _model(), AsyncSaver()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert not has_checkpoint(tmp_path)
    g = torch.Generator().manual_seed(1)
    first = []
    for step in range(1, 4):
        first.append(_step(model, opt, g))
        if step % 3 == 0:
            save(tmp_path, step, model=model, optimizer=opt, extra={"generator": g.get_state(), "step": step},
                 saver=saver)  # fmt: skip
    saver.wait()
    assert has_checkpoint(tmp_path)

    model2 = _model(seed=5)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    got = load(tmp_path, model=model2, optimizer=opt2)
    assert got.step == 3 and got.extra["step"] == 3
    g2 = torch.Generator()
    g2.set_state(got.extra["generator"])
    rest = [_step(model2, opt2, g2) for _ in range(3)]
    assert first + rest == straight


def test_a_model_that_does_not_fit_is_one_line(tmp_path):
    model = _model()
    save(tmp_path, 1, model=model)
    with pytest.raises(CheckpointError, match=r"does not fit this model: .*has shape \(10, 6\), the model's \(11, 6\)"):
        load(tmp_path, model=nn.Sequential(nn.Linear(6, 11), nn.GELU(), nn.Linear(11, 3)))
    with pytest.raises(CheckpointError, match="missing"):
        load(tmp_path, model=nn.Sequential(nn.Linear(6, 10)))


def _ddp_and_fsdp_worker(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    # DDP: rank 0 writes the replica; both ranks load it.
    model = DistributedDataParallel(_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 2, seed=rank)
    save(f"{root}/ddp", 2, model=model, optimizer=opt)
    # FSDP2 over both ranks: each rank writes its shard of every tensor.
    fsdp = _model()
    fully_shard(fsdp, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW(fsdp.parameters(), lr=1e-2)
    _train(fsdp, opt, 2, seed=rank)
    save(f"{root}/fsdp", 2, model=fsdp, optimizer=opt)
    # ... and loads the DDP checkpoint into FSDP2 shards: the same values as the DDP model's.
    load(f"{root}/ddp", model=fsdp, optimizer=opt)
    same = all(torch.equal(p.full_tensor(), q) for p, q in zip(fsdp.parameters(), model.module.parameters()))
    dist.barrier()
    return same


@pytest.mark.distributed
def test_ddp_and_fsdp2_checkpoints_load_anywhere(tmp_path):
    import json

    assert run_distributed(_ddp_and_fsdp_worker, 2, str(tmp_path), timeout=120) == [True, True]
    manifest = json.loads((tmp_path / "fsdp" / "checkpoints" / "step_00000002" / "manifest.json").read_text())
    assert {"model_r00000.pt", "model_r00001.pt", "optim_r00000.pt", "optim_r00001.pt"} <= set(manifest["files"])
    assert [s["shape"] for s in manifest["tensors"]["0.weight"]["shards"]] == [[5, 6], [5, 6]]
    # One process loads either: DDP's replica, FSDP2's shards assembled (model and AdamW state).
    for name in ("ddp", "fsdp"):
        model = _model(seed=9)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        assert load(tmp_path / name, model=model, optimizer=opt).step == 2
        assert all(len(opt.state[p]) == 3 for p in model.parameters())  # step, exp_avg, exp_avg_sq


def _tiny_gpt_cfg():
    from engine.config import Config, ModelConfig

    return Config(model=ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=64, seq_len=8, kernels="torch"))


def _tp_worker(rank, world, root):
    """A GPT split by parallelize_gpt over tp 2 trains a step, is saved through the API, loads back into a fresh tp
    model (its own slices), and returns its logits on fixed tokens."""
    from engine.model.gpt import GPT
    from engine.optim.distributed import build_training_optimizer
    from engine.parallel.dims import ParallelDims
    from engine.parallel.parallelize import parallelize_gpt

    cfg = _tiny_gpt_cfg()
    dims = ParallelDims.from_world(tp=2)

    def build(seed):
        cfg.train.seed = seed
        with torch.device("meta"):
            model = GPT(cfg.model)
        [chunk] = parallelize_gpt(model, dims, cfg, device="cpu")
        return chunk, build_training_optimizer(chunk, cfg.optim)

    model, opt = build(1)
    tokens = torch.arange(16).view(2, 8) % 64
    model(tokens, tokens).backward()
    opt.step()
    save(root, 1, model=model, optimizer=opt)
    fresh, fresh_opt = build(2)
    load(root, model=fresh, optimizer=fresh_opt)
    same = all(torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))
    with torch.no_grad():
        logits = model(tokens)
    dims.destroy()
    return same, logits.tolist()


@pytest.mark.distributed
def test_a_tensor_parallel_model_saves_its_slices_and_loads_whole_in_one_process(tmp_path):
    from engine.model.gpt import GPT

    out = run_distributed(_tp_worker, 2, str(tmp_path), timeout=120)
    assert [same for same, _ in out] == [True, True]
    from engine.optim.build import build_optimizer

    cfg = _tiny_gpt_cfg()
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.optim)  # the same weight-decay groups (AdamW with one group is refused: below)
    assert load(tmp_path, model=model, optimizer=opt).step == 1
    with torch.no_grad():
        logits = model(torch.arange(16).view(2, 8) % 64)
    torch.testing.assert_close(logits, torch.tensor(out[0][1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="mixes saved hyperparameters"):
        load(tmp_path, model=model, optimizer=torch.optim.AdamW(model.parameters()))
