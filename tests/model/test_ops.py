"""The backend switch: torch paths against explicit formulas, backend selection, triton parity (interpreter on CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import ConfigError
from engine.model import ops

HAS_CUDA = torch.cuda.is_available()


def test_select_and_errors(monkeypatch):
    x = torch.zeros(2)
    assert ops.select("torch", x) == "torch"
    assert ops.select("auto", x) == "torch"  # CPU: always torch, the interpreter is for tests
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.select("triton", x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="model.kernels=triton on cpu needs CUDA or TRITON_INTERPRET=1") as e:
        ops.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-5, backend="triton")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.kernels must be one of auto|torch|triton"):
        ops.check_backend("cuda")
    with pytest.raises(ConfigError, match="model.kernels must be one of"):
        ops.select("fast", x)


def test_forcing_triton_without_the_package(monkeypatch):
    monkeypatch.setattr(ops, "_triton_importable", lambda: False)
    with pytest.raises(ConfigError, match="needs the triton package"):
        ops.check_backend("triton")
    assert ops.select("auto", torch.zeros(1)) == "torch"


def test_torch_norms_match_formulas():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 16), torch.randn(16), torch.randn(16)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5, backend="torch"), ref)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(
        ops.layer_norm(x, w, b, 1e-5, backend="torch"), (x - mu) / torch.sqrt(var + 1e-5) * w + b
    )


def test_rope_matches_complex_rotation_and_preserves_dot_products():
    torch.manual_seed(0)
    b, s, h, d = 2, 7, 3, 8
    x = torch.randn(b, s, h, d)
    cos, sin = ops.rope_cos_sin(s, d, 10000.0)
    assert cos.shape == (s, d // 2)
    out = ops.apply_rope(x, cos, sin, backend="torch")
    # half-rotation convention = multiplying (x1 + i x2) by exp(i * pos * theta^(-2j/d))
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    ang = torch.arange(s).double()[:, None] * 10000.0 ** (-torch.arange(0, d, 2).double() / d)
    rz = z * torch.exp(1j * ang)[None, :, None, :]
    torch.testing.assert_close(out, torch.cat((rz.real, rz.imag), -1).float())
    # relative positions: <rope(q, m), rope(k, n)> depends only on m - n
    q, k = torch.randn(d), torch.randn(d)
    rot = lambda v, p: ops.apply_rope(v.expand(1, s, 1, d), cos, sin, backend="torch")[0, p, 0]
    assert torch.dot(rot(q, 5), rot(k, 3)).item() == pytest.approx(torch.dot(rot(q, 2), rot(k, 0)).item(), rel=1e-5)


def manual_attention(q, k, v, causal, mask=None):
    b, sq, h, d = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    allowed = torch.ones(sq, k.shape[1], dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_torch_causal_gqa_mask(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 6, 4, 8)
    k, v = torch.randn(2, 6, kv_heads, 8), torch.randn(2, 6, kv_heads, 8)
    torch.testing.assert_close(ops.attention(q, k, v, causal=True, backend="torch"), manual_attention(q, k, v, True))
    torch.testing.assert_close(ops.attention(q, k, v, causal=False, backend="torch"), manual_attention(q, k, v, False))
    # a padding mask (batch, 1, 1, seq_k): key 5 hidden from row 0
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[0, ..., 5] = False
    out = ops.attention(q, k, v, causal=True, mask=pad, backend="torch")
    torch.testing.assert_close(out, manual_attention(q, k, v, True, pad))
    torch.testing.assert_close(out[1], ops.attention(q, k, v, causal=True, backend="torch")[1])
    additive = torch.zeros(2, 1, 1, 6).masked_fill(~pad, float("-inf"))
    torch.testing.assert_close(ops.attention(q, k, v, causal=True, mask=additive, backend="torch"), out)


def test_cross_entropy_torch_ignore_index():
    torch.manual_seed(0)
    logits, target = torch.randn(10, 7), torch.randint(0, 7, (10,))
    target[:3] = -100
    ref = -logits.log_softmax(-1)[torch.arange(3, 10), target[3:]].mean()
    torch.testing.assert_close(ops.cross_entropy(logits, target, backend="torch"), ref)
    hidden, weight = torch.randn(10, 5), torch.randn(7, 5)
    torch.testing.assert_close(
        ops.linear_cross_entropy(hidden, weight, target, backend="torch"),
        F.cross_entropy(hidden @ weight.T, target),
    )


# -- triton backend: the real kernels (under TRITON_INTERPRET=1 on CPU) against the torch path, fp32 -------------


def _parity(fn, *inputs, rtol=1e-5, atol=1e-6):
    """Forward and input gradients of fn(backend=...) agree between torch and triton."""
    outs, grads = [], []
    for backend in ("torch", "triton"):
        xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*xs, backend=backend)
        torch.manual_seed(1)
        out.backward(torch.randn_like(out))
        outs.append(out.detach())
        grads.append([x.grad for x in xs if x.is_floating_point()])
    torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=atol)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_triton_rms_norm():
    torch.manual_seed(0)
    _parity(lambda x, w, backend: ops.rms_norm(x, w, 1e-5, backend=backend), torch.randn(2, 3, 32), torch.randn(32))


def test_triton_layer_norm():
    torch.manual_seed(0)
    _parity(
        lambda x, w, b, backend: ops.layer_norm(x, w, b, 1e-5, backend=backend),
        torch.randn(2, 3, 32),
        torch.randn(32),
        torch.randn(32),
    )


def test_triton_rope():
    torch.manual_seed(0)
    cos, sin = ops.rope_cos_sin(5, 16, 10000.0)
    _parity(lambda x, backend: ops.apply_rope(x, cos, sin, backend=backend), torch.randn(2, 5, 3, 16))


def test_triton_swiglu():
    torch.manual_seed(0)
    _parity(lambda g, u, backend: ops.swiglu(g, u, backend=backend), torch.randn(2, 3, 24), torch.randn(2, 3, 24))


@pytest.mark.parametrize("sq, sk, kv_heads", [(9, 9, 2), (5, 9, 1), (9, 9, 4)])
def test_triton_attention(monkeypatch, sq, sk, kv_heads):
    """The triton path runs kernels.flash_attention (GQA, and causal with seq_q < seq_k: bottom-right aligned on
    both paths), with the torch path's forward and gradients; a mask or dropout falls back to SDPA."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, sq, 4, 16), torch.randn(2, sk, kv_heads, 16), torch.randn(2, sk, kv_heads, 16)
    for causal in (True, False):
        _parity(lambda q, k, v, backend, c=causal: ops.attention(q, k, v, causal=c, backend=backend), q, k, v)
    calls = []
    real = ops._kernel

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(ops, "_kernel", spy)
    ops.attention(q, k, v, causal=True, backend="triton")
    ops.attention(q, k, v, causal=True, mask=torch.ones(sq, sk, dtype=torch.bool), backend="triton")
    assert calls == ["flash_attention"]
    if sq != sk:  # bottom-right: the last query row sees every key, the first sees sk - sq + 1
        out = ops.attention(q, k, v, causal=True, backend="torch")
        first = manual_attention(q[:, :1], k[:, : sk - sq + 1], v[:, : sk - sq + 1], False)
        torch.testing.assert_close(out[:, :1], first)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_segment_ids_and_window_on_both_paths(causal):
    """The torch path folds segment ids and a window into SDPA's boolean mask; the triton path passes them to our
    kernel; both match the kernel module's reference (forward and gradients), and the RoPE positions keyword rotates
    by each token's given position."""
    from kernels.attention import flash_attention_reference

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 21, 4, 16), torch.randn(2, 21, 2, 16), torch.randn(2, 21, 2, 16)
    seg = torch.tensor([[0] * 5 + [1] * 9 + [2] * 7, [0] * 21])
    for kw in (dict(segment_ids=seg), dict(window=4), dict(segment_ids=seg, window=6)):
        want = flash_attention_reference(q, k, v, causal=causal, **kw)
        torch.testing.assert_close(ops.attention(q, k, v, causal=causal, backend="torch", **kw), want)
        _parity(lambda q, k, v, backend, kw=kw: ops.attention(q, k, v, causal=causal, backend=backend, **kw), q, k, v)
    with pytest.raises(ValueError, match="attention: window must be a positive int"):
        ops.attention(q, k, v, window=0, backend="torch")
    with pytest.raises(ValueError, match="attention: segment_ids must be an integer tensor"):
        ops.attention(q, k, v, segment_ids=seg.float(), backend="torch")
    cos, sin = ops.rope_cos_sin(32, 16, 10000.0)
    pos = torch.tensor([[3, 4, 0, 1, 2] + list(range(16))] * 2)
    for backend in ("torch", "triton"):
        rotated = ops.apply_rope(q, cos, sin, backend=backend, positions=pos)
        torch.testing.assert_close(rotated[:, 2:5], ops.apply_rope(q[:, 2:5], cos[:3], sin[:3], backend=backend))
        torch.testing.assert_close(rotated[:, :2], ops.apply_rope(q[:, :2], cos[3:5], sin[3:5], backend=backend))


def test_triton_cross_entropy():
    torch.manual_seed(0)
    target = torch.randint(0, 50, (12,))
    target[2] = -100
    _parity(lambda x, backend: ops.cross_entropy(x, target, backend=backend), torch.randn(12, 50))
    _parity(
        lambda h, w, backend: ops.linear_cross_entropy(h, w, target, backend=backend),
        torch.randn(12, 16),
        torch.randn(50, 16),
    )


@pytest.mark.parametrize("apex_faster", [True, False])
def test_auto_norms_take_apex_only_when_installed_and_faster(monkeypatch, apex_faster):
    """The selection logic on CPU: select() is patched to say triton (as on CUDA) and apex is a stand-in whose
    timing verdict is patched; the real timing and apex numerics are in the gpu test below."""
    calls, measured = [], []
    monkeypatch.setattr(ops, "select", lambda backend, x: "torch" if backend == "torch" else "triton")
    monkeypatch.setattr(ops, "_apex_norm", lambda op: lambda x, w, b, eps: calls.append(("apex", op)) or x)
    monkeypatch.setattr(ops, "_kernel", lambda op: lambda *a, **k: calls.append(("triton", op)) or a[0])
    monkeypatch.setattr(ops, "_apex_faster", lambda *key: measured.append(key) or apex_faster)
    x, w, b = torch.randn(3, 5, 16), torch.ones(16), torch.zeros(16)
    ops.rms_norm(x, w, 1e-5)
    ops.layer_norm(x, w, b, 1e-5)
    winner = "apex" if apex_faster else "triton"
    assert calls == [(winner, "rms_norm"), (winner, "layer_norm")]
    # measured per op, hidden size, dtypes and bias; 15 rows bucket to 16
    assert measured == [
        ("rms_norm", 16, 16, torch.float32, torch.float32, False, 0),
        ("layer_norm", 16, 16, torch.float32, torch.float32, True, 0),
    ]
    calls.clear()
    ops.rms_norm(x, w, 1e-5, backend="triton")  # forcing triton never takes apex, nor times it
    ops.layer_norm(x, w, b, 1e-5, backend="torch")
    assert calls == [("triton", "rms_norm")] and len(measured) == 2
    calls.clear()
    ops.layer_norm(x, w, None, 1e-5)  # apex's affine LayerNorm needs a bias
    monkeypatch.setattr(ops, "_distributed", lambda: True)  # ranks would time on their own: keep ours
    ops.rms_norm(x, w, 1e-5)
    assert calls == [("triton", "layer_norm"), ("triton", "rms_norm")] and len(measured) == 2
    monkeypatch.setattr(ops, "_distributed", lambda: False)
    monkeypatch.setattr(ops, "_apex_norm", lambda op: None)  # apex absent: our kernel, no timing
    calls.clear()
    ops.rms_norm(x, w, 1e-5)
    assert calls == [("triton", "rms_norm")] and len(measured) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_apex_norm_path_on_gpu(op):
    if ops._apex_norm(op) is None:
        pytest.skip("NVIDIA apex with its CUDA norms is not installed")
    torch.manual_seed(0)
    x = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, device="cuda")
    b = torch.randn(1024, device="cuda")
    bias = b if op == "layer_norm" else None
    out = ops._apex_norm(op)(x, w, bias, 1e-5)
    ref = (F.rms_norm if op == "rms_norm" else F.layer_norm)(
        x.float(), (1024,), w, *([b] if bias is not None else []), eps=1e-5
    )
    assert out.dtype == x.dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    ops._apex_faster.cache_clear()
    with torch.no_grad():  # the first call of a run may be an evaluation: the timing still gets autograd
        assert isinstance(ops._apex_faster(op, 512, 1024, x.dtype, w.dtype, bias is not None, 0), bool)
        norm = ops.rms_norm(x, w, 1e-5) if op == "rms_norm" else ops.layer_norm(x, w, b, 1e-5)
    assert norm.shape == x.shape
