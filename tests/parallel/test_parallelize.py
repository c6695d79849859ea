"""parallelize_gpt's plan, registry and dims, in one process under torch's fake process group (sizes and ranks are
real, collectives do nothing): what each parameter becomes and how the registry describes it."""

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from engine.config import Config, ConfigError, ModelConfig
from engine.model.gpt import GPT
from engine.parallel.dims import ParallelDims
from engine.parallel.parallelize import TP_PLAN, parallelize_gpt
from engine.parallel.sharding import sharding_of
from engine.parallel.state import LayoutError
from engine.parallel.tensor import ColumnParallelLinear, ReplicatedKVLinear, RowParallelLinear, VocabParallelEmbedding


@pytest.fixture
def fake_world():
    def init(rank, world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


def _meta_model(**kw):
    base = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=101, seq_len=8, kernels="torch")
    cfg = Config(model=ModelConfig(**{**base, **kw}))
    with torch.device("meta"):
        return cfg, GPT(cfg.model)


def test_dims_sizes_flags_and_groups(fake_world):
    fake_world(5, 8)
    dims = ParallelDims.from_world(tp=2)
    assert (dims.dp, dims.dp_replicate, dims.tp) == (4, 4, 2)
    assert dims.tp_enabled and dims.dp_enabled and not dims.pp_enabled and not dims.dp_shard_enabled
    assert (dims.rank_in("tp"), dims.rank_in("dp")) == (1, 2)  # rank 5 = dp 2, tp 1 (tp fastest)
    assert dist.get_world_size(dims.group("tp")) == 2 and dist.get_world_size(dims.group("dp")) == 4
    assert dims.group("tp") is dims.group("tp")  # built once
    with pytest.raises(LayoutError, match="not divisible by tp"):
        ParallelDims(tp=3, world_size=8)
    with pytest.raises(LayoutError, match="unknown group kind"):
        dims.group("nope")
    dims.destroy()


@pytest.mark.parametrize("sp", [False, True])
def test_plan_converts_by_name_and_the_registry_describes_every_parameter(fake_world, sp):
    fake_world(1, 4)  # tp 4: 2 kv heads are replicated, 101 vocabulary rows pad to 104
    cfg, model = _meta_model(arch="llama")
    cfg.parallel.sp = sp
    [chunk] = parallelize_gpt(model, ParallelDims.from_world(tp=4), cfg, device="meta")
    assert chunk is model and all(p.is_meta for p in model.parameters())
    block = model.layers["1"]
    assert isinstance(model.tok_emb, VocabParallelEmbedding) and isinstance(model.output.proj, ColumnParallelLinear)
    assert model.output.proj.weight is model.tok_emb.weight  # still tied
    assert isinstance(block.attn.q_proj, ColumnParallelLinear) and isinstance(block.attn.o_proj, RowParallelLinear)
    assert isinstance(block.attn.k_proj, ReplicatedKVLinear) and isinstance(block.mlp.down_proj, RowParallelLinear)
    reg = sharding_of(model)
    q, o, emb = reg["layers.1.attn.q_proj.weight"], reg["layers.1.attn.o_proj.weight"], reg["tok_emb.weight"]
    assert (q.dim, q.rank, q.size, q.local_shape) == (0, 1, 4, (8, 32))
    assert (o.dim, o.local_shape) == (1, (32, 8))
    assert (emb.global_shape, emb.padded, emb.local_shape, emb.shard_range()) == ((101, 32), 104, (26, 32), (0, 26, 26))
    assert reg["layers.1.attn.k_proj.weight"].partial_grad and not reg["layers.1.attn.k_proj.weight"].sharded
    norms = [n for n, _ in model.named_parameters() if "norm" in n]
    assert all((reg.get(n) is not None and reg.get(n).sequence_parallel) == sp for n in norms)
    for name, p in model.named_parameters():  # every local shape agrees with the registry
        spec = reg.get(name)
        assert tuple(p.shape) == (spec.local_shape if spec is not None else tuple(p.shape)), name
    # The registry is keyed by canonical name: found through wrappers, and under wrapped names.
    assert sharding_of(torch.nn.Module()) is not reg
    compiled = torch.compile(model)
    assert sharding_of(compiled) is reg and reg.get("_orig_mod.layers.1.attn.q_proj.weight") is q
    assert reg.get("module.layers.1.attn.q_proj.weight") is q


def test_gpt2_positions_and_biases_under_sp(fake_world):
    fake_world(0, 2)
    cfg, model = _meta_model(arch="gpt2", n_kv_heads=0, tie_embeddings=False)
    cfg.parallel.sp = True
    parallelize_gpt(model, ParallelDims.from_world(tp=2), cfg, device="meta")
    reg = sharding_of(model)
    assert reg["pos_emb.weight"].sequence_parallel and reg["layers.0.attn.o_proj.bias"].sequence_parallel
    assert reg["layers.0.attn.q_proj.bias"].sharded and not reg["layers.0.attn.q_proj.bias"].sequence_parallel
    assert reg["output.proj.weight"].sharded and model.output.proj.weight is not model.tok_emb.weight


def test_refusals_are_one_line(fake_world):
    fake_world(0, 2)
    cfg, model = _meta_model(n_heads=4, n_kv_heads=4, seq_len=7)
    cfg.parallel.sp = True
    with pytest.raises(ConfigError, match="seq_len = 7 is not divisible by parallel.tp = 2"):
        parallelize_gpt(model, ParallelDims.from_world(tp=2), cfg, device="meta")
    with pytest.raises(LayoutError, match="sequence length 7 is not divisible by 2 x parallel.cp = 4"):
        parallelize_gpt(model, ParallelDims.from_world(cp=2), cfg, device="meta")
    assert all(not k.startswith("model.") for k in TP_PLAN)  # the plan addresses the plain model's names


def test_pipeline_split_gives_this_ranks_chunks(fake_world):
    fake_world(1, 4)  # pp 2 x tp 2: rank 1 is pp rank 0, tp rank 1
    cfg, model = _meta_model(n_layers=8)
    cfg.parallel.virtual_stages = 2
    chunks = parallelize_gpt(model, ParallelDims.from_world(tp=2, pp=2), cfg, device="meta")
    # 4 stages over 8 layers (embedding and head costed a layer each): [1, 3, 3, 1]; pp rank 0 holds stages 0, 2
    assert [list(c.layers) for c in chunks] == [["0"], ["4", "5", "6"]]
    assert chunks[0].tok_emb is not None and chunks[0].output is None and chunks[1].tok_emb is None
    assert isinstance(chunks[1].layers["4"].attn.q_proj, ColumnParallelLinear)  # tp inside every chunk
    assert sharding_of(chunks[1])["layers.4.attn.q_proj.weight"].size == 2
