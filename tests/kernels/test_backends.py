"""The `backend` switch of the `kernels` drop-ins (kernels/utils.py `use_triton`): "auto" runs the Triton kernel on
CUDA tensors or under the interpreter and the plain-torch reference elsewhere, decided at each call; "triton" is a
one-line error where the kernel cannot run; "torch" is the reference.

On CPU "elsewhere" is TRITON_INTERPRET=0, which the tests set with monkeypatch (the switch reads the environment at
each call). Each case spies on the op's autograd Function, so a test sees which path ran, not only the numbers.
"""

import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import attention, cross_entropy_loss, glu, linear_cross_entropy, norms, rope

IGN = -100


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _rope_module(backend):
    return kernels.RotaryEmbedding(8, max_seq_len=4, backend=backend)  # grows its tables on the first call


# name -> (module holding the Function, Function name, inputs(seed), ours(backend, *leaves), reference(*leaves)).
# `ours` uses the public module or function; `reference` the file's own plain-torch reference.
CASES = {
    "RMSNorm": (
        norms,
        "_NormFunction",
        lambda s: (_randn(2, 3, 16, seed=s), _randn(2, 3, 16, seed=s + 1)),
        lambda be, x, r: kernels.RMSNorm(16, backend=be)(x, r),
        lambda x, r: kernels.rms_norm_reference(x, torch.ones(16), 1e-6, r),
    ),
    "LayerNorm": (
        norms,
        "_NormFunction",
        lambda s: (_randn(4, 16, seed=s),),
        lambda be, x: kernels.LayerNorm(16, backend=be)(x),
        lambda x: kernels.layer_norm_reference(x, torch.ones(16), torch.zeros(16), 1e-5),
    ),
    "SwiGLU": (
        glu,
        "_GLUFunction",
        lambda s: (_randn(2, 5, 48, seed=s),),
        lambda be, gu: kernels.SwiGLU(backend=be)(gu),
        lambda gu: kernels.swiglu_reference(*gu.chunk(2, -1)),
    ),
    "GeGLU": (
        glu,
        "_GLUFunction",
        lambda s: (_randn(3, 24, seed=s), _randn(3, 24, seed=s + 1)),
        lambda be, g, u: kernels.GeGLU(backend=be)(g, u),
        lambda g, u: kernels.geglu_reference(g, u),
    ),
    "RotaryEmbedding": (
        rope,
        "_RopeFunction",
        lambda s: (_randn(2, 6, 3, 8, seed=s),),
        lambda be, x: _rope_module(be)(x, offset=2),
        lambda x: kernels.apply_rope_reference(x, *kernels.rope_cos_sin(8, 8), offset=2),
    ),
    "CrossEntropyLoss": (
        cross_entropy_loss,
        "CrossEntropyFunction",
        lambda s: (_randn(2, 3, 37, seed=s) * 3,),
        lambda be, x: kernels.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, backend=be)(x, _target((2, 3))),
        lambda x: kernels.cross_entropy_reference(x, _target((2, 3)), IGN, 0.1, 1e-3),
    ),
    "FusedLinearCrossEntropyLoss": (
        linear_cross_entropy,
        "FusedLinearCrossEntropyFunction",
        lambda s: (_randn(2, 3, 16, seed=s), _randn(37, 16, seed=s + 1) / 4),
        lambda be, h, w: kernels.FusedLinearCrossEntropyLoss(z_loss=1e-3, chunk_size=4, backend=be)(
            h, w, _target((2, 3))
        ),
        lambda h, w: kernels.fused_linear_cross_entropy_reference(h, w, _target((2, 3)), IGN, 0.0, 1e-3),
    ),
    "flash_attention": (
        attention,
        "FlashAttentionFunction",
        lambda s: (_randn(1, 5, 4, 16, seed=s), _randn(1, 7, 2, 16, seed=s + 1), _randn(1, 7, 2, 16, seed=s + 2)),
        lambda be, q, k, v: kernels.flash_attention(q, k, v, causal=True, return_lse=True, backend=be),
        lambda q, k, v: kernels.flash_attention_reference(q, k, v, causal=True, return_lse=True),
    ),
    "apply_rope_qk_": (
        rope,
        "_RopeInplaceFunction",
        lambda s: (_randn(2, 6, 4, 8, seed=s), _randn(2, 6, 2, 8, seed=s + 1)),
        lambda be, q, k: kernels.apply_rope_qk_(q * 1.0, k * 1.0, *kernels.rope_cos_sin(8, 8), backend=be),
        lambda q, k: (
            kernels.apply_rope_reference(q, *kernels.rope_cos_sin(8, 8)),
            kernels.apply_rope_reference(k, *kernels.rope_cos_sin(8, 8)),
        ),
    ),
}


def _target(shape):
    t = torch.randint(0, 37, shape, generator=torch.Generator().manual_seed(7))
    t.view(-1)[1] = IGN
    return t


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _forward_backward(fn, inputs):
    """Outputs and input gradients of fn on fresh leaves (each output's sum weighted, lse's -inf rows left out)."""
    leaves = [_leaf(t) for t in inputs]
    outs = _flat(fn(*leaves))
    total = sum((o.float().nan_to_num(posinf=0.0, neginf=0.0) * (i + 1)).sum() for i, o in enumerate(outs))
    total.backward()
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


@pytest.fixture
def spy(monkeypatch):
    """spy(module, name) counts the calls of that autograd Function's apply (and still runs it)."""
    calls = []

    def install(module, name):
        cls = getattr(module, name)
        original = cls.apply

        def counting(*args):
            calls.append(name)
            return original(*args)

        monkeypatch.setattr(cls, "apply", counting)
        return calls

    return install


@pytest.mark.parametrize("name", CASES)
def test_auto_on_cpu_without_the_interpreter_is_the_reference(name, monkeypatch, spy):
    module, fn_name, inputs, ours, reference = CASES[name]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = spy(module, fn_name)
    x = inputs(0)
    for backend in ("auto", "torch"):
        out, grads = _forward_backward(lambda *a, be=backend: ours(be, *a), x)
        ref_out, ref_grads = _forward_backward(reference, x)
        assert len(out) == len(ref_out)
        for a, b in zip(out + grads, ref_out + ref_grads):
            assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=1e-7), (name, backend)
    assert calls == []  # the kernel never ran


@pytest.mark.parametrize("name", CASES)
def test_forced_triton_on_cpu_without_the_interpreter_is_a_one_line_error(name, monkeypatch):
    _, _, inputs, ours, _ = CASES[name]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError) as err:
        ours("triton", *inputs(1))
    msg = str(err.value)
    assert "backend='triton' needs a CUDA tensor" in msg and "TRITON_INTERPRET=1" in msg and "\n" not in msg


@pytest.mark.parametrize("name", CASES)
def test_auto_with_the_interpreter_runs_the_kernel(name, monkeypatch, spy):
    module, fn_name, inputs, ours, reference = CASES[name]
    if torch.cuda.is_available():
        pytest.skip("the interpreter is set up only on machines without CUDA (tests/conftest.py)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = spy(module, fn_name)
    x = inputs(2)
    out, grads = _forward_backward(lambda *a: ours("auto", *a), x)
    assert calls, "the kernel did not run"
    ref_out, ref_grads = _forward_backward(reference, x)
    for a, b in zip(out + grads, ref_out + ref_grads):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


def test_the_switch_is_read_at_each_call(monkeypatch, spy):
    """One module object: the reference while TRITON_INTERPRET=0, the kernel once it is 1, the reference again."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter is set up only on machines without CUDA (tests/conftest.py)")
    calls = spy(norms, "_NormFunction")
    m = kernels.RMSNorm(8)
    x = torch.randn(3, 8)
    for env, ran in (("0", 0), ("1", 1), ("0", 1), ("", 1)):
        monkeypatch.setenv("TRITON_INTERPRET", env)
        m(x)
        assert len(calls) == ran, env


def test_functional_entry_points_take_the_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    assert torch.equal(kernels.rms_norm(x, w), kernels.rms_norm_reference(x, w))
    assert torch.equal(kernels.layer_norm(x, w, b, backend="torch"), kernels.layer_norm_reference(x, w, b))
    assert torch.equal(kernels.swiglu(x, w.expand(3, 8)), kernels.swiglu_reference(x, w.expand(3, 8)))
    assert torch.equal(kernels.geglu(x, x), kernels.geglu_reference(x, x))
    cos, sin = kernels.rope_cos_sin(4, 8)
    q = torch.randn(1, 4, 2, 8)
    assert torch.equal(kernels.apply_rope(q, cos, sin), kernels.apply_rope_reference(q, cos, sin))
    q2 = q.clone()
    assert kernels.apply_rope_(q2, cos, sin) is q2 and torch.equal(q2, kernels.apply_rope_reference(q, cos, sin))
    logits, t = torch.randn(5, 11).half(), torch.tensor([1, 2, IGN, 4, 10])
    loss = kernels.cross_entropy(logits, t)  # fp16 logits: fp32 math and loss, as the kernel
    assert loss.dtype == torch.float32 and torch.equal(loss, kernels.cross_entropy_reference(logits.float(), t))
    h, wt = torch.randn(5, 8), torch.randn(11, 8)
    assert torch.equal(
        kernels.fused_linear_cross_entropy(h, wt, t, reduction="sum"),
        kernels.fused_linear_cross_entropy_reference(h, wt, t, reduction="sum"),
    )
    # Under autocast the linear runs in the autocast dtype on both paths, and fp32 master weights get fp32 gradients.
    hl, wl = h.clone().requires_grad_(), wt.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels.fused_linear_cross_entropy(hl, wl, t).backward()
    assert hl.grad.dtype == wl.grad.dtype == torch.float32
    # The same argument checks on both paths.
    for backend in ("torch", "auto"):
        with pytest.raises(ValueError, match="outside"):
            kernels.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 11]), backend=backend)
        with pytest.raises(ValueError, match="weight has shape"):
            kernels.rms_norm(x, torch.ones(7), backend=backend)
        with pytest.raises(ValueError, match="reduction"):
            kernels.fused_linear_cross_entropy(h, wt, t, reduction="none", backend=backend)


@pytest.mark.parametrize(
    "build",
    [
        lambda: kernels.RMSNorm(8, backend="cuda"),
        lambda: kernels.LayerNorm(8, backend="fast"),
        lambda: kernels.SwiGLU(backend="Triton"),
        lambda: kernels.GeGLU(backend=""),
        lambda: kernels.RotaryEmbedding(8, backend="apex"),
        lambda: kernels.CrossEntropyLoss(backend="liger"),
        lambda: kernels.FusedLinearCrossEntropyLoss(backend=None),
        lambda: kernels.rms_norm(torch.ones(2, 4), None, backend="gpu"),
    ],
)
def test_unknown_backend_is_a_one_line_error(build):
    with pytest.raises(ValueError, match="backend must be one of auto, triton, torch") as err:
        build()
    assert "\n" not in str(err.value)


def test_repr_names_a_non_default_backend():
    assert "backend" not in repr(kernels.RMSNorm(8))
    assert "backend='torch'" in repr(kernels.RMSNorm(8, backend="torch"))
    assert "backend='triton'" in repr(kernels.SwiGLU(backend="triton"))


_NO_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as where it is not installed (macOS)
import torch
import kernels
from kernels.utils import triton_available
assert not triton_available()
x = torch.randn(2, 3, 16, requires_grad=True)
m = kernels.RMSNorm(16)
m(x).sum().backward()
assert torch.equal(m(x), kernels.rms_norm_reference(x, m.weight))
logits = torch.randn(4, 9, requires_grad=True)
kernels.CrossEntropyLoss()(logits, torch.tensor([1, 2, 3, 4])).backward()
kernels.flash_attention(*(torch.randn(1, 3, 2, 8) for _ in range(3)), causal=True)
try:
    kernels.SwiGLU(backend="triton")(x, x)
except ValueError as e:
    print("ERROR:", e)
"""


def test_kernels_import_and_run_without_triton():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines == [
        "ERROR: kernels.swiglu: backend='triton' needs the triton package (not installed); use 'auto' or 'torch'"
    ]


@pytest.mark.gpu
def test_a_module_built_on_cpu_and_moved_to_cuda_runs_the_kernel(spy):
    calls = spy(norms, "_NormFunction")
    m = kernels.RMSNorm(64)
    x = torch.randn(4, 64)
    ref = m(x)
    assert calls == []  # CPU, no interpreter on a CUDA machine: the reference
    m = m.cuda()
    out = m(x.cuda())
    assert calls == ["_NormFunction"]
    assert torch.allclose(out.cpu(), ref, rtol=1e-5, atol=1e-6)
