"""Adafactor against a plain-loop reference of the paper's algorithm (Shazeer & Stern 2018) on a toy regression."""

import copy
import math

import pytest
import torch

from engine.optim import Adafactor


class Reference:
    """Adafactor per the paper's formulas, one scalar at a time, in float64 Python lists."""

    def __init__(self, shapes, lr, beta1=None, weight_decay=0.0, relative_step=True, scale_parameter=True):
        self.lr, self.beta1, self.wd = lr, beta1, weight_decay
        self.relative_step, self.scale_parameter = relative_step, scale_parameter
        self.eps1, self.eps2, self.d = 1e-30, 1e-3, 1.0
        self.t = 0
        self.state = []
        for shape in shapes:
            if len(shape) == 2:
                n, m = shape
                self.state.append({"R": [0.0] * n, "C": [0.0] * m})
            else:
                self.state.append({"V": [0.0] * math.prod(shape)})
            self.state[-1]["M"] = [0.0] * math.prod(shape)

    def step(self, params, grads, lr):
        """params, grads: lists of (shape, flat list); returns new flat lists."""
        self.t += 1
        t = self.t
        b2 = 1 - t**-0.8
        rho = min(lr, 1 / math.sqrt(t)) if self.relative_step else lr
        out = []
        for (shape, theta), (_, g), st in zip(params, grads, self.state):
            rms_theta = math.sqrt(sum(x * x for x in theta) / len(theta))
            alpha = max(self.eps2, rms_theta) * rho if self.scale_parameter else rho
            if len(shape) == 2:
                n, m = shape
                for i in range(n):
                    st["R"][i] = b2 * st["R"][i] + (1 - b2) * sum(g[i * m + j] ** 2 for j in range(m))
                for j in range(m):
                    st["C"][j] = b2 * st["C"][j] + (1 - b2) * sum(g[i * m + j] ** 2 for i in range(n))
                sum_r = max(sum(st["R"]), self.eps1)
                v = [st["R"][i] * st["C"][j] / sum_r for i in range(n) for j in range(m)]
            else:
                st["V"] = [b2 * vv + (1 - b2) * gg * gg for vv, gg in zip(st["V"], g)]
                v = st["V"]
            u = [gg / math.sqrt(max(vv, self.eps1)) for gg, vv in zip(g, v)]
            rms_u = math.sqrt(sum(x * x for x in u) / len(u))
            u = [x / max(1.0, rms_u / self.d) for x in u]
            if self.beta1 is not None:
                st["M"] = [self.beta1 * mm + (1 - self.beta1) * x for mm, x in zip(st["M"], u)]
                u = st["M"]
            theta = [x - lr * self.wd * x for x in theta]
            out.append([x - alpha * uu for x, uu in zip(theta, u)])
        return out


def toy_problem():
    torch.manual_seed(0)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randn(16, 3, dtype=torch.float64)
    w = torch.randn(5, 3, dtype=torch.float64) * 0.5
    b = torch.randn(3, dtype=torch.float64) * 0.1
    return x, y, w, b


def loss_fn(x, y, w, b):
    return ((x @ w + b - y) ** 2).mean() + 0.1 * (w**4).sum()


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(beta1=0.9, weight_decay=0.1),
        dict(relative_step=False, scale_parameter=False),
    ],
)
def test_matches_reference(kw):
    x, y, w0, b0 = toy_problem()
    w, b = torch.nn.Parameter(w0.clone().float()), torch.nn.Parameter(b0.clone().float())
    opt = Adafactor([w, b], lr=0.05, **kw)
    ref = Reference([(5, 3), (3,)], lr=0.05, **kw)
    rw, rb = w0.clone(), b0.clone()
    lrs = [0.05, 0.04, 0.3, 0.02, 0.01] * 4  # the schedule rewrites group["lr"]; relative step caps it by 1/sqrt(t)
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss_fn(x.float(), y.float(), w, b).backward()
        opt.step()
        rw.requires_grad_(True)
        rb.requires_grad_(True)
        gw, gb = torch.autograd.grad(loss_fn(x, y, rw, rb), [rw, rb])
        new = ref.step(
            [((5, 3), rw.detach().flatten().tolist()), ((3,), rb.detach().tolist())],
            [((5, 3), gw.flatten().tolist()), ((3,), gb.tolist())],
            lr,
        )
        rw = torch.tensor(new[0], dtype=torch.float64).view(5, 3)
        rb = torch.tensor(new[1], dtype=torch.float64)
    torch.testing.assert_close(w.detach().double(), rw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.detach().double(), rb, rtol=1e-4, atol=1e-5)
    assert loss_fn(x, y, rw, rb) < loss_fn(x, y, w0, b0)


def test_factored_state_and_batched_matrices():
    p = torch.nn.Parameter(torch.randn(2, 6, 4))
    opt = Adafactor([p], lr=0.01)
    p.grad = torch.randn(2, 6, 4)
    opt.step()
    st = opt.state[p]
    assert st["row"].shape == (2, 6) and st["col"].shape == (2, 4) and "sq" not in st
    # leading dims are a batch: each matrix gets its own factored second moment (update clipping and the
    # parameter scale use the RMS of the whole tensor, so turn those off to compare with separate matrices)
    p2 = torch.nn.Parameter(torch.stack([torch.randn(6, 4), torch.randn(6, 4)]))
    kw = dict(lr=0.01, scale_parameter=False, clip_threshold=1e9)
    opt2 = Adafactor([p2], **kw)
    singles = [torch.nn.Parameter(p2.detach()[i].clone()) for i in range(2)]
    opt3 = [Adafactor([s], **kw) for s in singles]
    g = torch.randn(2, 6, 4)
    p2.grad = g
    opt2.step()
    for i in range(2):
        singles[i].grad = g[i].clone()
        opt3[i].step()
        torch.testing.assert_close(p2.detach()[i], singles[i].detach())


def test_update_clipping_bounds_the_step():
    # first step of a vector: V = G^2, U = sign(G), RMS(U) = 1; a matrix whose G has one huge entry gets clipped
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = Adafactor([p], lr=1.0, relative_step=False, scale_parameter=False)
    g = torch.full((4, 4), 1e-3)
    g[0, 0] = 1e3
    p.grad = g
    opt.step()
    rms = p.detach().norm() / 4
    assert rms.item() == pytest.approx(1.0, rel=1e-5)  # clipped to RMS d = 1 with lr 1


def test_state_dict_resume_is_exact():
    x, y, w0, b0 = toy_problem()
    x, y = x.float(), y.float()

    def run(opt, w, b, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(x, y, w, b).backward()
            opt.step()

    w, b = torch.nn.Parameter(w0.float()), torch.nn.Parameter(b0.float())
    opt = Adafactor([w, b], lr=0.05, beta1=0.9, weight_decay=0.1)
    run(opt, w, b, 6)
    w2, b2 = torch.nn.Parameter(w0.float()), torch.nn.Parameter(b0.float())
    opt2 = Adafactor([w2, b2], lr=0.05, beta1=0.9, weight_decay=0.1)
    run(opt2, w2, b2, 3)
    sd = copy.deepcopy(opt2.state_dict())
    opt3 = Adafactor([w2, b2], lr=0.05, beta1=0.9, weight_decay=0.1)
    opt3.load_state_dict(sd)
    run(opt3, w2, b2, 3)
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_bf16_params_keep_fp32_state():
    p = torch.nn.Parameter(torch.randn(8, 4).bfloat16())
    opt = Adafactor([p], lr=0.01)
    p.grad = torch.randn(8, 4).bfloat16()
    before = p.detach().clone()
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["row"].dtype == torch.float32
    assert not torch.equal(before, p.detach())


def test_bad_arguments():
    p = torch.nn.Parameter(torch.zeros(2))
    for kw in (dict(lr=0.0), dict(beta1=1.0), dict(decay_rate=0.5), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError, match="Adafactor"):
            Adafactor([p], **{"lr": 0.01, **kw})
