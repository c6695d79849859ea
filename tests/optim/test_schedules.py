"""Learning-rate schedules against their formulas (engine/optim/schedules.py's docstring), at lr 1 and a real peak."""

import math

import pytest

from engine.config import ConfigError, OptimConfig
from engine.optim import lr_at, set_lr


def cfg(**kw) -> OptimConfig:
    return OptimConfig(**{"lr": 1.0, "min_lr_ratio": 0.1, "warmup": 10, **kw})


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_linear_warmup(schedule):
    c = cfg(schedule=schedule)
    assert [lr_at(s, c, 100) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_at(10, c, 100) == pytest.approx(1.0)


def test_cosine_formula():
    c = cfg(schedule="cosine")
    for s in range(10, 100):
        r = (s - 10) / 90
        assert lr_at(s, c, 100) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * r)) * 0.9, rel=1e-12)
    assert lr_at(55, c, 100) == pytest.approx(0.55)  # halfway: the mean of peak and floor
    assert lr_at(100, c, 100) == pytest.approx(0.1) and lr_at(10_000, c, 100) == pytest.approx(0.1)
    assert cfg(schedule="cosine", min_lr_ratio=0.0, lr=3e-4).lr == 3e-4
    assert lr_at(99, cfg(schedule="cosine", min_lr_ratio=0.0), 100) > 0


def test_decay_steps_overrides_total_and_extension_is_invariant():
    c = cfg(schedule="cosine", decay_steps=50)
    # a run extended from 50 to 200 steps follows the same curve: only decay_steps matters
    assert [lr_at(s, c, 50) for s in range(60)] == [lr_at(s, c, 200) for s in range(60)]
    assert lr_at(30, c, 200) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 20 / 40)) * 0.9)
    with pytest.raises(ConfigError, match="decay_steps"):
        lr_at(20, cfg(schedule="cosine"), 0)


def test_wsd_formula():
    c = cfg(schedule="wsd", wsd_decay_fraction=0.2)  # D = 100: stable 10..79, linear decay 80..99
    for s in range(10, 80):
        assert lr_at(s, c, 100) == 1.0
    for s in range(80, 100):
        assert lr_at(s, c, 100) == pytest.approx(1.0 - 0.9 * (s - 80) / 20)
    assert lr_at(100, c, 100) == pytest.approx(0.1) and lr_at(500, c, 100) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="wsd_decay_fraction"):
        lr_at(50, cfg(schedule="wsd", wsd_decay_fraction=1.5), 100)


def test_inverse_sqrt_formula():
    c = cfg(schedule="inverse_sqrt", warmup=16, lr=2.0)
    for s in range(0, 300):
        n = s + 1
        assert lr_at(s, c, 100) == pytest.approx(2.0 * min(n / 16, math.sqrt(16 / n)))
    assert lr_at(15, c, 100) == pytest.approx(2.0)  # the peak at the end of warmup
    assert lr_at(63, c, 100) == pytest.approx(1.0)  # 16/64 -> half the peak
    c0 = cfg(schedule="inverse_sqrt", warmup=0)
    assert [lr_at(s, c0, 10) for s in range(4)] == pytest.approx([1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5])


def test_constant_and_no_warmup():
    c = cfg(schedule="constant", warmup=0, lr=0.5)
    assert {lr_at(s, c, 10) for s in range(50)} == {0.5}
    assert lr_at(0, cfg(schedule="cosine", warmup=0), 100) == pytest.approx(1.0)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="optim.schedule must be one of"):
        lr_at(0, cfg(schedule="linear"), 10)
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(-1, cfg(), 10)


def test_set_lr_respects_lr_scale():
    import torch

    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q], "lr_scale": 0.5}], lr=1.0)
    set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]


# min_lr_ratio is a fraction of optim.lr: with lr 1.0 an absolute floor and a relative one coincide, so these use a
# realistic peak where they differ by four orders of magnitude.
PEAK, RATIO = 3e-4, 0.1
FLOOR = PEAK * RATIO  # 3e-5


def test_cosine_floor_is_a_ratio_of_lr():
    c = cfg(schedule="cosine", lr=PEAK, min_lr_ratio=RATIO)  # warmup 10, D = 100
    assert lr_at(9, c, 100) == pytest.approx(PEAK, rel=1e-12)  # the peak at the end of warmup
    assert lr_at(10, c, 100) == pytest.approx(PEAK, rel=1e-12)
    assert lr_at(55, c, 100) == pytest.approx(0.5 * (PEAK + FLOOR), rel=1e-12)  # halfway: 1.65e-4
    r = (32 - 10) / 90
    assert lr_at(32, c, 100) == pytest.approx(FLOOR + 0.5 * (1 + math.cos(math.pi * r)) * (PEAK - FLOOR), rel=1e-12)
    assert lr_at(99, c, 100) > FLOOR
    assert lr_at(100, c, 100) == pytest.approx(FLOOR, rel=1e-12) and lr_at(10_000, c, 100) == pytest.approx(FLOOR)
    assert all(FLOOR <= lr_at(s, c, 100) <= PEAK for s in range(10, 200))


def test_wsd_floor_is_a_ratio_of_lr():
    c = cfg(schedule="wsd", lr=PEAK, min_lr_ratio=RATIO, wsd_decay_fraction=0.2)  # stable 10..79, decay 80..99
    assert {lr_at(s, c, 100) for s in range(10, 80)} == {PEAK}
    assert lr_at(90, c, 100) == pytest.approx(PEAK - (PEAK - FLOOR) * 10 / 20, rel=1e-12)  # mid-decay: 1.65e-4
    assert lr_at(95, c, 100) == pytest.approx(PEAK - (PEAK - FLOOR) * 15 / 20, rel=1e-12)
    assert lr_at(100, c, 100) == pytest.approx(FLOOR, rel=1e-12) and lr_at(500, c, 100) == pytest.approx(FLOOR)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "inverse_sqrt", "constant"])
def test_every_schedule_scales_with_lr(schedule):
    """The whole curve, floor included, is proportional to lr (inverse_sqrt and constant have no floor)."""
    unit = cfg(schedule=schedule, lr=1.0, min_lr_ratio=RATIO, wsd_decay_fraction=0.2)
    scaled = cfg(schedule=schedule, lr=PEAK, min_lr_ratio=RATIO, wsd_decay_fraction=0.2)
    for s in range(0, 150):
        assert lr_at(s, scaled, 100) == pytest.approx(PEAK * lr_at(s, unit, 100), rel=1e-12)


def test_inverse_sqrt_ignores_min_lr_ratio():
    a = cfg(schedule="inverse_sqrt", lr=PEAK, warmup=16, min_lr_ratio=0.0)
    b = cfg(schedule="inverse_sqrt", lr=PEAK, warmup=16, min_lr_ratio=0.5)
    assert [lr_at(s, a, 100) for s in range(0, 2000, 7)] == [lr_at(s, b, 100) for s in range(0, 2000, 7)]
    assert lr_at(1023, a, 100) == pytest.approx(PEAK * math.sqrt(16 / 1024), rel=1e-12)  # below any 0.5 floor
