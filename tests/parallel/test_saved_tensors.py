"""SavedTensorScope (engine/parallel/saved_tensors.py), on its own: a registered tensor saved by operations inside the
scope is saved as its source's payload and rebuilt once for all of them, in whatever view each saved; a tensor changed
in place after registration is saved as it is; outer hooks see every other saved tensor and the payload once."""

import torch

from engine.parallel.saved_tensors import SavedSource, SavedTensorScope


class _Halved(SavedSource):
    """A registered tensor saved as its half (a stand-in for a shard) and rebuilt by doubling: a counted rebuild."""

    builds = 0

    def build(self, half):
        _Halved.builds += 1
        return half * 2


def _grads(x, w, register, inplace=False, hooks=None):
    """d/dw of sum((x @ w)^2) + sum((x.t() @ x)^2) + sum(x.view(-1) * 3) style consumers of one registered tensor."""
    w = w.clone().requires_grad_()
    x = x.clone().requires_grad_()
    y = x * 1.0  # the registered tensor: an intermediate
    scope = SavedTensorScope()
    if register:
        scope.add(y, _Halved((y.detach() / 2,)))
    outer = hooks if hooks is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with outer, scope:
        if inplace:
            y.mul_(3.0)
        a = (y @ w).square().sum()  # saves y (2-d, as it is)
        b = (y.t() @ y).square().sum()  # saves a transposed view and y
        c = (y.reshape(-1)[1:] * y.reshape(-1)[:-1]).sum()  # saves views at offsets 0 and 1
    (a + b + c).backward()
    return w.grad, x.grad


def test_views_rebuild_from_the_payload_once_and_match_the_plain_gradients():
    x, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    _Halved.builds = 0
    got = _grads(x, w, register=True)
    assert _Halved.builds == 1  # one rebuild for the four consumers
    want = _grads(x, w, register=False)
    assert all(torch.allclose(g, r, rtol=0, atol=1e-12) for g, r in zip(got, want, strict=True))


def test_a_tensor_changed_in_place_is_saved_as_it_is():
    x, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    _Halved.builds = 0
    got = _grads(x, w, register=True, inplace=True)
    assert _Halved.builds == 0
    want = _grads(x, w, register=False, inplace=True)
    assert all(torch.allclose(g, r, rtol=0, atol=1e-12) for g, r in zip(got, want, strict=True))


def test_outer_hooks_see_the_payload_once_and_every_other_tensor():
    seen = []

    def pack(t):
        seen.append(tuple(t.shape))
        return ("packed", t)

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda p: p[1])
    x, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    got = _grads(x, w, register=True, hooks=hooks)
    assert seen.count((6, 4)) == 1  # the payload (the registered tensor itself is never handed out)
    assert (4, 3) in seen  # w, saved by the matmul: not registered, packed by the outer hooks
    want = _grads(x, w, register=False)
    assert all(torch.allclose(g, r, rtol=0, atol=1e-12) for g, r in zip(got, want, strict=True))


def test_a_view_of_a_larger_storage_is_not_registered():
    """Its storage holds more than it: another view of that storage must not be rebuilt from it."""
    buffer = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)  # so that the products save their inputs
    y = buffer * 1.0
    part, other = y[:6], y[6:]
    scope = SavedTensorScope()
    _Halved.builds = 0
    scope.add(part, _Halved((part.detach() / 2,)))
    with scope:
        loss = (part @ w).square().sum() + (other @ w).square().sum()
    loss.backward()
    assert _Halved.builds == 0
    got_w, w.grad = w.grad, None
    want = buffer.detach().clone().requires_grad_()
    ((want * 1.0) @ w).square().sum().backward()
    assert torch.allclose(buffer.grad, want.grad, rtol=0, atol=1e-12) and torch.allclose(got_w, w.grad, rtol=0,
                                                                                        atol=1e-12)  # fmt: skip
