"""engine.scaling.memory against hand-computed numbers (Korthikanti et al. 2022, arXiv 2205.05198, sec. 4).

The small config throughout: s = 8, b = 2, h = 16, a = 2, v = 64, so sbh = 8 * 2 * 16 = 256 and
5as/h = 5 * 2 * 8 / 16 = 5. Every expected number below is written out as literal arithmetic, not recomputed
through the module's formula.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from engine.scaling import (
    ActivationEstimate,
    activation_bytes_per_layer,
    estimate_activations,
    format_bytes,
    optimizer_state_bytes,
)

S, B, H, A, V = 8, 2, 16, 2, 64


def per_layer(**kw):
    return activation_bytes_per_layer(S, B, H, A, **kw)


def test_per_layer_hand_computed_each_variant():
    # no parallelism: sbh(34 + 5as/h) = 256 * (34 + 5) = 256 * 39
    assert per_layer() == 9984
    # tp=1 with sp is the same row
    assert per_layer(sp=True) == 9984
    # tp=2: sbh(10 + 24/t + 5as/(ht)) = 256 * (10 + 12 + 2.5) = 256 * 24.5
    assert per_layer(tp=2) == 6272
    # tp=4: 256 * (10 + 6 + 1.25) = 256 * 17.25
    assert per_layer(tp=4) == 4416
    # tp=2 + sp: sbh/t (34 + 5as/h) = 128 * 39
    assert per_layer(tp=2, sp=True) == 4992
    # selective, no parallelism: 34 sbh = 34 * 256
    assert per_layer(recompute="selective") == 8704
    # selective, tp=2 only: sbh(10 + 24/t) = 256 * 22
    assert per_layer(tp=2, recompute="selective") == 5632
    # selective, tp=2 + sp: 34 sbh/t = 34 * 128
    assert per_layer(tp=2, sp=True, recompute="selective") == 4352
    # full: the layer input only, 2sbh = 512 (replicated across tp without sp), 2sbh/t = 256 with sp
    assert per_layer(recompute="full") == 512
    assert per_layer(tp=2, recompute="full") == 512
    assert per_layer(tp=2, sp=True, recompute="full") == 256


def test_per_layer_rounds_fractional_bytes_up():
    # s=3, b=1, h=5, a=1, t=2: sbh = 15, 5as/(ht) = 15/10 = 1.5 -> 15 * (10 + 12 + 1.5) = 352.5 -> 353
    assert activation_bytes_per_layer(3, 1, 5, 1, tp=2) == 353


def test_sequence_parallel_shards_the_replicated_ten_term():
    # tp alone keeps 10sbh replicated; sp divides it by t too: tp+sp = tp-alone - 10sbh(1 - 1/t)
    for tp in (2, 4, 8):
        alone, with_sp = per_layer(tp=tp), per_layer(tp=tp, sp=True)
        assert with_sp < alone
        assert alone - with_sp == 10 * 256 - 10 * 256 // tp
    assert per_layer(tp=2) - per_layer(tp=2, sp=True) == 1280  # 6272 - 4992 = 10 * 256 / 2


def test_full_below_selective_below_none():
    for tp, sp in ((1, False), (2, False), (2, True), (8, True)):
        full, selective, none = (per_layer(tp=tp, sp=sp, recompute=r) for r in ("full", "selective", "none"))
        assert full < selective < none, (tp, sp)


def test_estimate_first_and_last_stage():
    # tp=2 + sp, 3 layers, pp=1 (both stages): 3 * 4992 + embedding mask sbh/t = 128
    # + output 4sbh/t (1 + v/h) = 4 * 128 * (1 + 4) = 2560 (= 2sbh/t + 2sbh/t + 4sbv/t = 256 + 256 + 2048)
    est = estimate_activations(S, B, H, A, V, 3, tp=2, sp=True)
    assert est == ActivationEstimate(
        per_layer_bytes=4992, layers=3, embedding_bytes=128, output_bytes=2560, total_bytes=14976 + 128 + 2560
    )
    assert est.total_bytes == 17664


def test_estimate_without_sp_keeps_replicated_extras():
    # tp=2, no sp: 3 * 6272 + embedding mask sbh = 256 + output 4sbh + 4sbv/t = 1024 + 2048 = 3072
    est = estimate_activations(S, B, H, A, V, 3, tp=2)
    assert (est.embedding_bytes, est.output_bytes) == (256, 3072)
    assert est.total_bytes == 18816 + 256 + 3072 == 22144


def test_last_stage_false_drops_the_output_term_and_in_flight_multiplies():
    # first stage of a pipeline with 4 micro-batches in flight: (3 * 4992 + 128) * 4, no output term
    est = estimate_activations(S, B, H, A, V, 3, tp=2, sp=True, last_stage=False, in_flight_microbatches=4)
    assert est.output_bytes == 0
    assert est.embedding_bytes == 512
    assert est.total_bytes == (14976 + 128) * 4 == 60416
    both = estimate_activations(S, B, H, A, V, 3, tp=2, sp=True)
    assert both.total_bytes - both.output_bytes == (
        estimate_activations(S, B, H, A, V, 3, tp=2, sp=True, last_stage=False).total_bytes
    )


def test_middle_and_last_stage():
    # last stage, 2 in flight: 3 * 4992 * 2 + 2560 (output counted once), no embedding term
    est = estimate_activations(S, B, H, A, V, 3, tp=2, sp=True, first_stage=False, in_flight_microbatches=2)
    assert (est.embedding_bytes, est.output_bytes, est.total_bytes) == (0, 2560, 29952 + 2560)
    mid = estimate_activations(S, B, H, A, V, 3, tp=2, sp=True, first_stage=False, last_stage=False)
    assert (mid.embedding_bytes, mid.output_bytes, mid.total_bytes) == (0, 0, 14976)


def test_fractional_in_flight_rounds_up():
    # interleaved-style factor 1.5: (3 * 4992 + 128) * 1.5 = 15104 * 1.5 = 22656, + 2560
    est = estimate_activations(S, B, H, A, V, 3, tp=2, sp=True, in_flight_microbatches=1.5)
    assert est.total_bytes == 22656 + 2560


def test_gpt3_175b_paper_numbers():
    # GPT-3 175B (paper Table 3): a = 96, h = 12288, s = 2048, t = 8; 5as/h = 5 * 96 * 2048 / 12288 = 80.
    # tp+sp per layer, b = 1: sbh/t = 2048 * 12288 / 8 = 3145728 bytes; * (34 + 80) = 358612992 = 342 MiB;
    # selective: * 34 = 106954752 = 102 MiB.
    none = activation_bytes_per_layer(2048, 1, 12288, 96, tp=8, sp=True)
    selective = activation_bytes_per_layer(2048, 1, 12288, 96, tp=8, sp=True, recompute="selective")
    assert none == 3145728 * 114 == 358612992
    assert selective == 3145728 * 34 == 106954752
    assert format_bytes(none) == "342.00 MiB"
    # The paper: selective recomputation cuts activation memory by 70% for GPT-3 (80 / 114) ...
    assert round(100 * (none - selective) / none) == 70
    # ... and 65% for MT-NLG 530B (a = 128, h = 20480, s = 2048: 5as/h = 64, 64 / 98)
    mt_none = activation_bytes_per_layer(2048, 1, 20480, 128, tp=8, sp=True)
    mt_sel = activation_bytes_per_layer(2048, 1, 20480, 128, tp=8, sp=True, recompute="selective")
    assert round(100 * (mt_none - mt_sel) / mt_none) == 65
    # Abstract: sp + selective reduce activation memory about 5x against tensor parallelism alone
    # (GPT-3: (10 + 3 + 10) / (34 / 8) = 5.41; MT-NLG: (10 + 3 + 8) / (34 / 8) = 4.94)
    assert round(activation_bytes_per_layer(2048, 1, 12288, 96, tp=8) / selective) == 5
    assert round(activation_bytes_per_layer(2048, 1, 20480, 128, tp=8) / mt_sel) == 5


def test_optimizer_state_bytes():
    assert optimizer_state_bytes(1000) == 8000  # adamw: 2 fp32 moments
    assert optimizer_state_bytes(1000, master_weights=True) == 12000  # + fp32 master copy
    assert optimizer_state_bytes(1000, "adafactor") == 4000  # unfactored upper bound
    assert optimizer_state_bytes(1000, "adafactor", master_weights=True) == 8000
    # exact with shapes: a 4x5 matrix keeps row (4) + col (5) fp32 = 36 B, a 4-vector keeps 16 B, + 2 step scalars 8 B
    assert optimizer_state_bytes(24, "adafactor", shapes=[(4, 5), (4,)]) == 36 + 16 + 8
    # batched 3-d (2, 4, 5): row (2*4) + col (2*5) = 18 floats = 72 B, + 4 B step
    assert optimizer_state_bytes(40, "adafactor", shapes=[(2, 4, 5)]) == 76
    # adamw with shapes: 8 B/param + 4 B step per tensor
    assert optimizer_state_bytes(24, "adamw", shapes=[(4, 5), (4,)]) == 192 + 8
    with pytest.raises(ValueError, match="n_params_local"):
        optimizer_state_bytes(25, "adafactor", shapes=[(4, 5), (4,)])
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_state_bytes(10, "sgd")


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1024) == "1.00 KiB"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(int(1.23 * 1024**3)) == "1.23 GiB"
    assert format_bytes(1024**2 - 1) == "1.00 MiB"  # not "1024.00 KiB"
    assert format_bytes(3 * 1024**4) == "3.00 TiB"
    assert format_bytes(-2048) == "-2.00 KiB"


def test_bad_arguments():
    with pytest.raises(ValueError, match="recompute"):
        per_layer(recompute="attention")
    with pytest.raises(ValueError, match="tp"):
        per_layer(tp=0)
    with pytest.raises(ValueError, match="in_flight"):
        estimate_activations(S, B, H, A, V, 3, in_flight_microbatches=0)
    assert estimate_activations(S, B, H, A, V, 0, last_stage=False).total_bytes == 256  # embedding mask only


def test_import_is_light():
    code = (
        "import sys, engine.scaling as m; m.estimate_activations; "
        "bad = [k for k in ('torch', 'engine.parallel', 'engine.train') if k in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
