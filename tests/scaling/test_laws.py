"""engine.scaling.flops and engine.scaling.laws against numbers worked out by hand (each in a comment) and against
the papers' own tables: Kaplan et al. 2020, Hoffmann et al. 2022 (Chinchilla), Besiroglu et al. 2024, Pearce & Song
2024, and Megatron's FLOP formulas (Narayanan et al. 2021, Korthikanti et al. 2022)."""

import math

import numpy as np
import pytest

from engine.config import ModelConfig
from engine.model.gpt import count_params, flops_per_token, resolve
from engine.scaling import (
    BESIROGLU,
    CHINCHILLA_APPROACH1,
    CHINCHILLA_APPROACH2,
    CHINCHILLA_APPROACH3,
    CHINCHILLA_EXPONENTS,
    KAPLAN,
    LAWS,
    PF_DAY,
    KaplanLaw,
    ParametricLaw,
    hardware_flops_per_token,
    hardware_flops_utilization,
    optimal_non_embedding,
    peak_flops_of,
    pearce_song_total_params,
    training_flops,
)

# ---------------------------------------------------------------------------------------------------- FLOPs


def test_flops_per_token_with_and_without_recompute_by_hand():
    cfg = resolve(ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=100, seq_len=32))  # llama, tied
    # ffn_hidden = ceil(8 * 64 / (3 * 64)) * 64 = 3 * 64 = 192; head dim Q = 16.
    # non-embedding: per layer q, k, v, o 4 * 64^2 = 16384, gate/up/down 3 * 64 * 192 = 36864, two norms 128
    # = 53376; x 2 layers + final norm 64 = 106,816. Matmul N = that + the output projection 100 * 64 = 113,216.
    assert count_params(cfg, non_embedding=True) == 106_816
    # model: 6 * 113216 + 12 L H Q T = 679,296 + 12 * 2 * 4 * 16 * 32 (= 49,152) = 728,448
    assert flops_per_token(cfg) == hardware_flops_per_token(cfg) == 728_448
    # selective: the attention core's forward again, 4 L H Q T = 16,384 -> 744,832
    assert hardware_flops_per_token(cfg, "selective") == 744_832
    # full: every layer's forward again, 2 * 106,816 + 16,384 = 230,016 -> 958,464
    assert hardware_flops_per_token(cfg, "full") == 958_464
    # recompute defaults to the config's
    assert hardware_flops_per_token(ModelConfig(**{**cfg.__dict__, "recompute": "full"})) == 958_464
    with pytest.raises(ValueError, match="recompute"):
        hardware_flops_per_token(cfg, "some")


def test_megatron_formulas_for_a_gpt_block():
    """Narayanan et al. 2021: F / (B s) = 96 l h^2 (1 + s/(6h) + V/(16 l h)) with full recompute; Korthikanti et al.
    2022: 72 l h^2 (1 + s/(6h) + V/(12 l h)) without. Their 12 h^2 weights a layer leave out the biases and
    LayerNorms (13h a layer, 2h for the final norm), which the engine's N includes at 6 (8) FLOPs each."""
    layers, h, s, v = 2, 64, 32, 100
    cfg = ModelConfig(arch="gpt2", n_layers=layers, d_model=h, n_heads=4, vocab_size=v, seq_len=s)
    small = layers * 13 * h + 2 * h  # 1,792
    # full: 96 * 2 * 4096 + 16 * 2 * 64 * 32 + 6 * 64 * 100 = 786,432 + 65,536 + 38,400 = 890,368
    assert hardware_flops_per_token(cfg, "full") == 890_368 + 8 * small
    assert 96 * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h)) == pytest.approx(890_368)
    # none: 72 * 2 * 4096 + 12 * 2 * 64 * 32 + 6 * 64 * 100 = 589,824 + 49,152 + 38,400 = 677,376
    assert hardware_flops_per_token(cfg, "none") == 677_376 + 6 * small
    assert 72 * layers * h * h * (1 + s / (6 * h) + v / (12 * layers * h)) == pytest.approx(677_376)


def test_training_flops_mfu_hfu_and_peaks():
    assert training_flops(6 * 1e9, 20e9) == 1.2e20  # C = 6ND for N = 1B, D = 20B
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=100, seq_len=32, recompute="full")
    # 1000 tokens/s on 2 devices of 1e9 FLOP/s: HFU = 1000 * 958,464 / 2e9
    assert hardware_flops_utilization(1000, cfg, 1e9, 2) == pytest.approx(0.479232)
    assert hardware_flops_utilization(1000, cfg, None, 2) is None
    assert peak_flops_of("h100") == peak_flops_of("H100_SXM") == 989e12
    assert peak_flops_of("h200") == 989e12 and peak_flops_of("a100") == 312e12 and peak_flops_of("b200") == 2250e12
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        peak_flops_of("tpu")


# ---------------------------------------------------------------------------------------------------- Kaplan


def test_kaplan_closed_forms():
    # L(N) at N = N_c / 10: 10^0.076 = e^(0.076 * 2.302585) = e^0.174996 = 1.191242
    assert KAPLAN.loss_n(8.8e12) == pytest.approx(1.191242, rel=1e-6)
    # L(D) at D = D_c / 10: 10^0.095 = e^0.218746 = 1.244515
    assert KAPLAN.loss_d(5.4e12) == pytest.approx(1.244515, rel=1e-6)
    # L(N, D) at N = N_c, D = D_c (Table 2 constants): (1 + 1)^0.103 = e^(0.103 * 0.693147) = 1.074004
    assert KAPLAN.loss(6.4e13, 1.8e13) == pytest.approx(1.074004, rel=1e-6)
    # L(C_min) at C_min = C_c^min: 1; at C_min = C_c^min / 1e5 PF-days: 1e5^0.05 = 10^0.25 = 1.778279
    assert KAPLAN.loss_c_min(3.1e8 * PF_DAY) == pytest.approx(1.0)
    assert KAPLAN.loss_c_min(3.1e3 * PF_DAY) == pytest.approx(1.778279, rel=1e-6)
    assert not KAPLAN.embedding


def test_kaplan_predicts_4_68b_at_1e21_with_c_min_half_of_c():
    """Chinchilla appendix D.4: Kaplan's law gives 4.68B parameters at 1e21 FLOPs. With C_min = C / 2 (training at
    the critical batch size costs twice the minimum compute, Kaplan eq. 5.5): C_min = 5e20 / 8.64e19 = 5.787 PF-days,
    5.787^0.73 = e^(0.73 * 1.75563) = e^1.28161 = 3.60223, x 1.3e9 = 4.683e9. With C_min = C it would be 11.574
    PF-days, 11.574^0.73 = e^(0.73 * 2.44878) = 5.9751, x 1.3e9 = 7.768e9."""
    assert KAPLAN.n_opt(1e21) == pytest.approx(4.683e9, rel=1e-3)
    assert round(KAPLAN.n_opt(1e21) / 1e9, 2) == 4.68
    assert KaplanLaw(critical_batch_factor=1.0).n_opt(1e21) == pytest.approx(7.768e9, rel=1e-3)
    # D = C / (6N) = 1e21 / (6 * 4.683e9) = 3.559e10; Table 6's 2e10 * 5.787^0.27 = 3.20e10 is within 10%
    assert KAPLAN.d_opt(1e21) == pytest.approx(3.559e10, rel=1e-3)
    assert 2e10 * 5.787**0.27 == pytest.approx(KAPLAN.d_opt(1e21), rel=0.11)
    # exponents of the frontier: doubling C multiplies N by 2^0.73
    assert KAPLAN.n_opt(2e21) / KAPLAN.n_opt(1e21) == pytest.approx(2**0.73)


# ---------------------------------------------------------------------------------------------------- Chinchilla


def test_parametric_frontier_closed_form_by_hand():
    """Rounded App. D.2 constants E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28:
    a = 0.28 / 0.62 = 0.451613, b = 0.548387; G = (0.34 * 406.4 / (0.28 * 410.7))^(1/0.62) = (138.176 / 114.996)
    ^1.612903 = 1.201572^1.612903 = e^(1.612903 * 0.183630) = e^0.296177 = 1.344711.
    At C = 6e20: C / 6 = 1e20, N = 1.3447 * 1e20^0.451613 = 1.3447 * e^(0.451613 * 46.051702) = 1.3447 *
    e^20.797 = 1.3447 * 1.0772e9 = 1.4486e9; D = 1e20 / N = 6.903e10 (47.7 tokens per parameter)."""
    law = ParametricLaw("rounded", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    assert law.a == pytest.approx(0.451613, rel=1e-6) and law.b == pytest.approx(0.548387, rel=1e-6)
    assert law.G == pytest.approx(1.344711, rel=1e-6)
    assert law.n_opt(6e20) == pytest.approx(1.4486e9, rel=1e-3)
    assert law.d_opt(6e20) == pytest.approx(6.903e10, rel=1e-3)
    # the frontier is the minimum of L along C = 6ND, and uses the budget exactly
    n, d = law.n_opt(6e20), law.d_opt(6e20)
    assert 6 * n * d == pytest.approx(6e20, rel=1e-12)
    for f in (0.9, 0.99, 1.01, 1.1):
        assert law.loss(n * f, d / f) > law.loss(n, d)
    # loss by hand at N = 1e9, D = 1e10: 1.69 + 406.4 / 1e9^0.34 + 410.7 / 1e10^0.28 = 1.69 + 406.4 / 1148.15 +
    # 410.7 / 630.957 = 1.69 + 0.353960 + 0.650915 = 2.694875
    assert law.loss(1e9, 1e10) == pytest.approx(2.694875, rel=1e-6)


def test_chinchilla_exponents_and_the_gopher_budget():
    """At Gopher's 5.76e23 FLOPs (Chinchilla Table 3), Approach 1 gives 69B parameters on 1.39T tokens (the
    table: 67B; Chinchilla itself: 70B on 1.4T); Approach 3's fit gives a smaller model on more data: 40.4B on
    2.38T, 59 tokens per parameter, consistent with its own projection in Table A3 (67B on 4.1T tokens)."""
    c = 5.76e23
    # Approach 1: 1e9 * (5.76e23 / 1.21e20)^0.5 = 1e9 * sqrt(4760.3) = 6.900e10
    assert CHINCHILLA_APPROACH1.n_opt(c) == pytest.approx(6.900e10, rel=1e-3)
    assert CHINCHILLA_APPROACH1.n_opt(c) == pytest.approx(70e9, rel=0.05)
    assert CHINCHILLA_APPROACH1.d_opt(c) == pytest.approx(1.4e12, rel=0.05)
    assert CHINCHILLA_APPROACH1.tokens_per_param(c) == pytest.approx(20.2, abs=0.1)  # Table 3: ~20-22
    assert CHINCHILLA_APPROACH1.n_opt(1e21) == pytest.approx(2.86e9, rel=0.01)  # appendix D.4: 2.86B at 1e21
    assert CHINCHILLA_APPROACH2.n_opt(c) == pytest.approx(67e9, rel=0.06)  # Table A3, Approach 2: 67B on 1.7T
    a3 = CHINCHILLA_APPROACH3
    # published exponents (Table 2): a = 0.46, b = 0.54
    assert (round(a3.a, 2), round(a3.b, 2)) == CHINCHILLA_EXPONENTS[3] == (0.46, 0.54)
    assert a3.n_opt(c) == pytest.approx(40.4e9, rel=0.01) and a3.d_opt(c) == pytest.approx(2.38e12, rel=0.01)
    assert a3.tokens_per_param(c) == pytest.approx(58.9, abs=0.1)
    assert a3.n_opt(6 * 67e9 * 4.1e12) == pytest.approx(67e9, rel=0.05)  # Table A3's Approach 3 row
    assert a3.E == pytest.approx(1.69, abs=0.005) and a3.A == pytest.approx(406.4, abs=0.05)
    assert a3.B == pytest.approx(410.7, abs=0.05)
    # Besiroglu et al.'s refit: a = 0.3658 / 0.7136 = 0.5126, about 20 tokens per parameter
    assert BESIROGLU.a == pytest.approx(0.5126, abs=1e-4)
    assert 15 < BESIROGLU.tokens_per_param(c) < 25 and 15 < BESIROGLU.tokens_per_param(1e21) < 25
    assert [law.embedding for law in LAWS.values()] == [False, True, True, True, True]


# ---------------------------------------------------------------------------------------------------- Pearce & Song


def test_non_embedding_counting_moves_the_exponent_toward_kaplans():
    """Pearce & Song 2024 on synthetic models. (1) Llama-style models at d_model / n_layers = 39.2 with one tied 32k
    embedding follow N_T = N_E + 47491 N_E^(1/3). (2) If the world follows a Chinchilla-type law in total parameters,
    someone who counts only non-embedding parameters and compute (C_E = 6 N_E D) and fits N_E* vs C_E over Kaplan's
    model range (N_E from 10^2.9 to 10^9.2) finds a local exponent near Kaplan's 0.73, not the law's a."""
    for layers in (4, 12, 48):
        d = 64 * round(39.2 * layers / 64) if layers > 4 else 160  # 39.2 * 4 = 157 -> 160 (heads of 32)
        cfg = resolve(ModelConfig(n_layers=layers, d_model=d, n_heads=d // 32, vocab_size=32000, ffn_hidden=8 * d // 3))
        n_e = count_params(cfg, non_embedding=True)
        assert pearce_song_total_params(n_e) == pytest.approx(count_params(cfg), rel=0.01)

    budgets = np.logspace(12, 24, 49)
    for law, low, high in ((CHINCHILLA_APPROACH3, 0.72, 0.78), (BESIROGLU, 0.75, 0.81)):
        n_e = np.array([optimal_non_embedding(law, c) for c in budgets])
        kaplan_range = (n_e >= 10**2.9) & (n_e <= 10**9.2)
        assert kaplan_range.sum() >= 20
        local = np.polyfit(np.log(budgets[kaplan_range]), np.log(n_e[kaplan_range]), 1)[0]
        assert low < local < high, (law.name, local)  # Chinchilla's constants: 0.752; Besiroglu's: 0.785
        # counting every parameter and FLOP (gamma = 0) recovers the law's own a
        n_t = np.array([optimal_non_embedding(law, c, gamma=0) for c in budgets[kaplan_range]])
        total = np.polyfit(np.log(budgets[kaplan_range]), np.log(n_t), 1)[0]
        assert total == pytest.approx(law.a, abs=1e-3)
        assert local - total > 0.25
    # the golden-section optimum of the gamma = 0 case is the closed-form frontier
    assert optimal_non_embedding(CHINCHILLA_APPROACH3, 1e21, gamma=0) == pytest.approx(
        CHINCHILLA_APPROACH3.n_opt(1e21), rel=1e-6
    )
    assert math.isclose(pearce_song_total_params(1e9), 1e9 + 47491 * 1000, rel_tol=1e-9)
