"""build_optimizer (parameter groups, AdamW implementations, Adafactor) and global-norm gradient clipping."""

import pytest
import torch

from engine.config import ConfigError, ModelConfig, OptimConfig
from engine.model import GPT
from engine.optim import Adafactor, build_optimizer, clip_grad_norm, grad_norm, param_groups
from tests.distributed import run_distributed


def model(arch="llama", tied=True):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layers=2, d_model=32, n_heads=2, vocab_size=64, seq_len=16, kernels="torch")
    cfg.tie_embeddings = tied
    return GPT(cfg)


def test_param_groups_llama_tied():
    m = model("llama", tied=True)
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    leaves = {n.rsplit(".", 2)[-2] for n in decay["names"]}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(no_decay["names"]) == {"tok_emb.weight", "output.norm.weight"} | {
        f"layers.{i}.{k}.weight" for i in range(2) for k in ("attn_norm", "mlp_norm")
    }
    n_group = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n_group == m.num_params()  # every parameter once (the tied head is the embedding)


def test_param_groups_gpt2_untied():
    m = model("gpt2", tied=False)
    decay, no_decay = param_groups(m, 0.1)
    assert "output.proj.weight" in decay["names"]  # an untied output head is a matmul weight
    names = set(no_decay["names"])
    assert {"tok_emb.weight", "pos_emb.weight", "layers.0.attn.q_proj.bias", "output.norm.bias"} <= names
    assert all(p.ndim == 2 for p in decay["params"])
    decay_e, _ = param_groups(m, 0.1, decay_embeddings=True)
    assert {"tok_emb.weight", "pos_emb.weight"} <= set(decay_e["names"])


def test_adamw_decays_only_the_decay_group():
    m = model("gpt2", tied=False)
    opt = build_optimizer(m, OptimConfig(lr=0.1, weight_decay=0.5, impl="torch"))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # Adam's step is 0 with a zero gradient: only decay moves weights
    opt.step()
    for n, p in m.named_parameters():
        factor = 1 - 0.1 * 0.5 if n in opt.param_groups[0]["names"] else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor)


def test_adamw_impls():
    m = model()
    c = OptimConfig(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.05)
    auto = build_optimizer(m, c)
    assert isinstance(auto, torch.optim.AdamW) and auto.defaults["fused"] is True  # torch has a CPU fused AdamW
    assert auto.defaults["betas"] == (0.8, 0.9) and auto.defaults["eps"] == 1e-6
    c.impl = "torch"
    assert not build_optimizer(m, c).defaults["fused"]
    c.impl = "fused"
    assert build_optimizer(m, c).defaults["fused"] is True
    # the same trajectory either way, to rounding
    results = []
    for impl in ("torch", "fused"):
        mm = model()
        opt = build_optimizer(mm, OptimConfig(lr=1e-2, impl=impl))
        x = torch.randint(0, 64, (2, 16))
        for _ in range(3):
            mm(x, x).backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach() for p in mm.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_apex_and_bad_names():
    try:
        from apex.optimizers import FusedAdam  # noqa: F401

        has_apex = True
    except Exception:  # noqa: BLE001 - the check build_optimizer makes: any import failure is "no apex"
        has_apex = False
    if not has_apex:
        with pytest.raises(ConfigError, match="optim.impl=apex needs NVIDIA apex"):
            build_optimizer(model(), OptimConfig(impl="apex"))
    with pytest.raises(ConfigError, match="optim.name must be adamw or adafactor"):
        build_optimizer(model(), OptimConfig(name="sgd"))
    with pytest.raises(ConfigError, match="optim.impl must be"):
        build_optimizer(model(), OptimConfig(impl="triton"))
    with pytest.raises(ConfigError, match="optim.beta2"):
        build_optimizer(model(), OptimConfig(beta2=1.0))


# -- NVIDIA apex detection -------------------------------------------------------------------------------------------
# The package named `apex` on the public index is an unrelated project; a half-built NVIDIA apex fails at import in
# other ways than ImportError. Fake packages on sys.path stand in for both.

_FAKE_APEX = {
    # an `apex` without the optimizers subpackage (the unrelated project): ImportError
    "no_optimizers": {"apex/__init__.py": ""},
    # an `apex` written for Python 2 (as the unrelated project's old releases are): SyntaxError
    "python2_package": {"apex/__init__.py": 'print "apex web toolkit"\n'},
    # a half-built NVIDIA apex whose CUDA extension library is missing: OSError
    "missing_library": {
        "apex/__init__.py": "",
        "apex/optimizers/__init__.py": "raise OSError('libfused_adam_cuda.so: cannot open shared object file')\n",
    },
    # an apex whose optimizers package trips over the installed torch: AttributeError
    "attribute_error": {
        "apex/__init__.py": "",
        "apex/optimizers/__init__.py": "import torch\ntorch._no_such_attribute_in_torch\n",
    },
    # a working apex (stand-in FusedAdam): taken for impl=apex, never for auto
    "working": {
        "apex/__init__.py": "",
        "apex/optimizers/__init__.py": (
            "import torch\n\n"
            "class FusedAdam(torch.optim.AdamW):\n"
            "    def __init__(self, params, adam_w_mode=True, **kw):\n"
            "        self.adam_w_mode = adam_w_mode\n"
            "        super().__init__(params, **kw)\n"
        ),
    },
}


@pytest.fixture
def fake_apex(tmp_path, monkeypatch):
    """Installs one of _FAKE_APEX on sys.path (hiding any real apex) and restores sys.modules afterwards."""
    import importlib
    import sys

    saved = {k: v for k, v in sys.modules.items() if k == "apex" or k.startswith("apex.")}

    def install(kind):
        for rel, text in _FAKE_APEX[kind].items():
            f = tmp_path / kind / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
        for k in list(sys.modules):
            if k == "apex" or k.startswith("apex."):
                del sys.modules[k]
        monkeypatch.syspath_prepend(str(tmp_path / kind))
        importlib.invalidate_caches()

    yield install
    for k in list(sys.modules):
        if k == "apex" or k.startswith("apex."):
            del sys.modules[k]
    sys.modules.update(saved)


@pytest.mark.parametrize("kind", ["no_optimizers", "python2_package", "missing_library", "attribute_error"])
def test_apex_impl_without_a_usable_apex_is_a_one_line_config_error(fake_apex, kind):
    fake_apex(kind)
    with pytest.raises(ConfigError, match="optim.impl=apex needs NVIDIA apex") as err:
        build_optimizer(model(), OptimConfig(impl="apex"))
    assert "\n" not in str(err.value)
    auto = build_optimizer(model(), OptimConfig(impl="auto"))
    assert type(auto) is torch.optim.AdamW


def test_apex_taken_only_when_asked(fake_apex):
    fake_apex("working")
    opt = build_optimizer(model(), OptimConfig(impl="apex", lr=1e-3))
    assert type(opt).__name__ == "FusedAdam" and opt.adam_w_mode and opt.defaults["lr"] == 1e-3
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    for impl in ("auto", "torch", "fused"):
        assert type(build_optimizer(model(), OptimConfig(impl=impl))) is torch.optim.AdamW


def test_adafactor_built_with_groups():
    m = model()
    opt = build_optimizer(m, OptimConfig(name="adafactor", lr=0.01, weight_decay=0.1))
    assert isinstance(opt, Adafactor)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    x = torch.randint(0, 64, (2, 16))
    first = m(x, x).item()
    for _ in range(5):
        m(x, x).backward()
        opt.step()
        opt.zero_grad()
    assert m(x, x).item() < first


# -- clipping -------------------------------------------------------------------------------------------------------


def _params_with_grads(scale):
    torch.manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (5,), (2, 2, 2)]]
    for p in ps:
        p.grad = torch.randn_like(p) * scale
    ps.append(torch.nn.Parameter(torch.randn(3)))  # no grad: ignored
    return ps


def test_clip_matches_torch_and_returns_preclip_norm():
    ours, ref = _params_with_grads(10.0), _params_with_grads(10.0)
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ours[:3])).float()
    norm = clip_grad_norm(ours, 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.testing.assert_close(norm, expected)
    torch.testing.assert_close(norm, ref_norm)
    for a, b in zip(ours[:3], ref[:3]):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(grad_norm(ours), torch.tensor(1.0), rtol=1e-5, atol=0)


def test_clip_leaves_small_grads_and_zero_turns_off():
    small = _params_with_grads(0.01)
    before = [p.grad.clone() for p in small[:3]]
    norm = clip_grad_norm(small, 1.0)
    assert norm < 1.0 and all(torch.equal(a, p.grad) for a, p in zip(before, small))
    big = _params_with_grads(10.0)
    before = [p.grad.clone() for p in big[:3]]
    assert clip_grad_norm(big, 0.0) > 1.0
    assert all(torch.equal(a, p.grad) for a, p in zip(before, big))
    assert clip_grad_norm([torch.nn.Parameter(torch.zeros(2))], 1.0).item() == 0.0  # no grads at all


def _clip_ddp_and_sharded(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    ddp = DDP(net)
    torch.manual_seed(42)
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    mine = slice(4 * rank, 4 * rank + 4)
    torch.nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
    ddp_norm = clip_grad_norm(ddp.parameters(), 0.5)
    # a "sharded" gradient: each rank holds half of one vector; the group sums squared norms
    torch.manual_seed(7)
    full = torch.randn(10)
    shard = torch.nn.Parameter(torch.zeros(5))
    shard.grad = full[5 * rank : 5 * rank + 5].clone()
    sharded_norm = clip_grad_norm([shard], 1.0, group=torch.distributed.group.WORLD)
    # plain lists: tensors sent through the result queue would live in the exiting child's shared memory
    grads = [p.grad.tolist() for p in net.parameters()]
    return ddp_norm.item(), grads, sharded_norm.item(), shard.grad.tolist(), full.norm().item()


@pytest.mark.distributed
def test_clip_under_ddp_and_with_a_group():
    results = run_distributed(_clip_ddp_and_sharded, 2, timeout=120)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    torch.manual_seed(42)
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    torch.nn.functional.mse_loss(net(x), y).backward()  # DDP averages the two half-batch means = the full mean
    norm = clip_grad_norm(net.parameters(), 0.5)
    for ddp_norm, grads, sharded_norm, _, full_norm in results:
        assert ddp_norm == pytest.approx(norm.item(), rel=1e-5)
        for g, p in zip(grads, net.parameters()):
            torch.testing.assert_close(torch.tensor(g), p.grad, rtol=1e-5, atol=1e-7)
        assert sharded_norm == pytest.approx(full_norm, rel=1e-6)
    # after clipping with the group, the two shards together have norm 1
    total = sum(torch.tensor(r[3]).square().sum() for r in results).sqrt()
    assert total.item() == pytest.approx(1.0, rel=1e-5)
