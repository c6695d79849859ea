"""engine/precision/fp8.py on CPU (torch's float8 dtypes, the GEMMs through the reference): the amax-history rules,
Fp8Linear's output and gradients against fp32 (signal-to-quantisation-noise ratio), the amax reduced across ranks
over gloo, and the history's checkpoint state."""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from engine.precision.fp8 import AmaxHistory, Fp8Linear, Fp8Recipe, Fp8Scaler, global_amax
from kernels.fp8 import fp8_quantize
from tests.distributed import run_distributed


def sqnr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    noise = (approx.double() - exact.double()).pow(2).sum()
    return 10 * math.log10(exact.double().pow(2).sum() / noise)


def test_amax_history_rolls_takes_the_window_max_and_the_margin():
    h = AmaxHistory(3)
    assert h.scale_amax() is None  # empty: the first step scales by its own amax
    for a in (1.0, 5.0, 2.0):
        h.record(torch.tensor(a))
    assert h.history.tolist() == [2.0, 5.0, 1.0] and h.scale_amax().item() == 5.0
    assert h.scale_amax(margin=2).item() == 20.0
    h.record(torch.tensor(3.0))  # 1.0 leaves the window; 5.0 still in it
    assert h.history.tolist() == [3.0, 2.0, 5.0] and h.scale_amax().item() == 5.0
    h.record(torch.tensor(0.5))
    h.record(torch.tensor(0.25))  # 5.0 leaves
    assert h.scale_amax().item() == 3.0
    restored = AmaxHistory(3)
    restored.load_state_dict(h.state_dict())
    assert torch.equal(restored.history, h.history) and restored.seen == h.seen


def test_delayed_scaling_quantises_with_the_past_and_records_the_present():
    recipe = Fp8Recipe("delayed", history_len=4)
    scaler = Fp8Scaler(recipe, "e4m3")
    x1, x2 = torch.full((4, 8), 2.0), torch.full((4, 8), 4.0)
    _, s1 = scaler.quantize(x1)
    assert s1.item() == pytest.approx(2.0 / 448)  # empty history: its own amax
    data, s2 = scaler.quantize(x2)
    assert s2.item() == pytest.approx(2.0 / 448)  # step 1's amax: x2 (4.0) saturates at 448 * s2 = 2.0
    assert (data.float() * s2).max().item() == pytest.approx(2.0)
    _, s3 = Fp8Scaler(Fp8Recipe("current"), "e4m3").quantize(x2)
    assert s3.item() == pytest.approx(4.0 / 448)
    with pytest.raises(ValueError, match="fp8 scaling must be one of current, delayed"):
        Fp8Recipe("static")


@pytest.mark.parametrize("scaling", ["current", "delayed", "block"])
def test_fp8_linear_output_and_gradients_within_20db_of_fp32(scaling):
    torch.manual_seed(0)
    ref = nn.Linear(300, 140)  # 3 x 2 weight blocks of 128 (the last ones ragged) for the block recipe
    with torch.no_grad():  # blocks of very different magnitudes: a scale applied to the wrong block shows
        ref.weight *= torch.logspace(0, 2, 300)
    fp8 = Fp8Linear.from_linear(nn.Linear(300, 140), Fp8Recipe(scaling))
    fp8.load_state_dict(ref.state_dict())
    x, dy = torch.randn(3, 50, 300), torch.randn(3, 50, 140)  # 150 rows: two tiles along dW's K
    for _ in range(2):  # delayed: the second step scales by the first's amaxes
        results = []
        for layer in (ref, fp8):
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            y.backward(dy)
            results.append((y.detach(), xi.grad, layer.weight.grad, layer.bias.grad))
    (y0, dx0, dw0, db0), (y1, dx1, dw1, db1) = results
    for name, a, b in (("y", y1, y0), ("dx", dx1, dx0), ("dW", dw1, dw0)):
        assert sqnr_db(a, b) >= 20, (name, sqnr_db(a, b))
        assert not torch.equal(a, b), name  # fp8 really applied
    assert torch.allclose(db1, db0)  # the bias gradient is a plain sum
    assert set(dict(fp8.named_parameters())) == {"weight", "bias"}
    state = fp8.fp8_state_dict()
    assert state["weight"]["seen"] == (2 if scaling == "delayed" else 0)


def _sharded_amax(rank, world):
    torch.manual_seed(0)
    full = torch.randn(8, 16) * torch.arange(1, 9).view(8, 1)  # the largest rows on the last rank
    mine = full.chunk(world)[rank]
    assert global_amax(mine, dist.group.WORLD).item() == full.abs().max().item()
    scaler = Fp8Scaler(Fp8Recipe("current"), "e4m3", dist.group.WORLD)
    data, scale = scaler.quantize(mine)
    want_data, want_scale = fp8_quantize(full, "e4m3", "tensor", backend="torch")
    assert torch.equal(scale, want_scale)  # every rank scales as one process would
    assert torch.equal(data.float(), want_data.float().chunk(world)[rank])
    return True


@pytest.mark.distributed
def test_amax_reduced_over_the_ranks_a_tensor_is_split_across():
    assert all(run_distributed(_sharded_amax, 2))
