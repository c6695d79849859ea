"""`--train.dry_run true`: builds on the meta device for a layout (torch's fake process group in place of peers) and
prints parameter counts and per-rank memory, checked here against counts made by hand."""

import subprocess
import sys

from engine.config import load_config
from engine.training.dry_run import dry_run

SCRIPT = (
    "import resource, sys; from engine.train import main; rc = main(sys.argv[1:]); "
    "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
)


def test_llama3_70b_at_tp8_answers_in_seconds_in_little_memory():
    args = ["--config", "examples/configs/llama3_70b.toml", "--parallel.tp", "8", "--train.dry_run", "true"]
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "70,553,706,496 parameters (70.554B)" in lines[0]  # within 0.1% of Llama 3's 70.55B
    assert "68,452,360,192 non-embedding" in lines[0] and "tp 8 + sp" in lines[0]
    # By hand, per tp rank: q and o 8192 x 8192 / 8, k and v 1024 x 8192 / 8 (8 kv heads, one per rank), gate, up
    # and down 28672 x 8192 / 8, two RMSNorm gains 8192 (replicated): 106,971,136 per layer, x 80 = 8,557,690,880;
    # embedding and untied output 128256 / 8 = 16032 rows x 8192 = 131,334,144 each; final norm 8192.
    hand = 80 * (2 * 8192 * 8192 // 8 + 2 * 1024 * 8192 // 8 + 3 * 28672 * 8192 // 8 + 2 * 8192)
    hand += 2 * 16032 * 8192 + 8192
    assert hand == 8_820_367_360
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == [str(i) for i in range(8)]
    assert all(r[1] == f"{hand:,}" for r in rows)
    assert rows[0][2:4] == ["32.86", "GiB"]  # 4 bytes a parameter: 35,281,469,440 B
    maxrss_gb = int(lines[-1].split()[1]) / 2**20
    assert maxrss_gb < 2.0, maxrss_gb


def test_rank_bytes_with_vocabulary_padding(tmp_path):
    """gpt2, untied, vocab 101 over tp 2: rank 0 holds 51 vocabulary rows, rank 1 50 + one padding row; the
    column-parallel biases split, the row-parallel biases, norms and positions are replicated."""
    cfg = load_config(
        ["--model.arch", "gpt2", "--model.n_layers", "2", "--model.d_model", "16", "--model.n_heads", "4",
         "--model.vocab_size", "101", "--model.seq_len", "8", "--model.tie_embeddings", "false",
         "--parallel.tp", "2", "--train.global_batch", "2", "--optim.name", "adamw"]
    )  # fmt: skip
    printed = []
    report = dry_run(cfg, out=printed.append)
    d, f = 16, 64
    # per layer and rank: q, k, v (16 x 16 / 2 + 8 bias each), o (16 x 8 + 16 bias), up (64 / 2 x 16 + 32 bias),
    # down (16 x 32 + 16 bias), two LayerNorms (2 x 16 each)
    layer = 3 * (d * d // 2 + d // 2) + (d * d // 2 + d) + (f // 2 * d + f // 2) + (d * f // 2 + d) + 2 * 2 * d
    hand = 2 * layer + 2 * d + 8 * d + 2 * 51 * d  # final LayerNorm, positions, embedding + output (51 rows each)
    assert [r.params for r in report.ranks] == [hand, hand]
    assert report.total_params == 2 * (4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d) + 2 * d + 8 * d + 2 * 101 * d
    r = report.ranks[0]
    assert (r.param_bytes, r.grad_bytes, r.optimizer_bytes) == (4 * hand, 4 * hand, 8 * hand)
    assert r.activation_bytes > 0 and r.total_bytes == 16 * hand + r.activation_bytes
    assert "dry run: gpt2" in printed[0] and len(printed) == 5


def test_zero1_shards_the_optimizer_bytes(monkeypatch):
    """With parallel.zero1 each rank of dp 4 holds a quarter of AdamW's 8 bytes a parameter (rounded up), the figure
    tests/train/test_train_zero1.py measures on real ranks."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = ["--model.n_layers", "2", "--model.d_model", "32", "--model.vocab_size", "64", "--train.global_batch", "4"]
    plain = dry_run(load_config(args), out=lambda s: None).ranks[0]
    zero1 = dry_run(load_config([*args, "--parallel.zero1", "true"]), out=lambda s: None).ranks[0]
    assert zero1.params == plain.params and zero1.grad_bytes == plain.grad_bytes == 4 * plain.params
    assert plain.optimizer_bytes == 8 * plain.params and zero1.optimizer_bytes == 8 * -(-plain.params // 4)


def test_bf16_parameters_with_zero1_bytes(monkeypatch):
    """bf16 parameters under ZeRO-1 at dp 4: 2 bytes of parameter, 4 of fp32 gradient, and (8 of AdamW + 4 of fp32
    master weight) / 4 of state a parameter."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = ["--model.n_layers", "2", "--model.d_model", "32", "--model.vocab_size", "64", "--train.global_batch", "4",
            "--parallel.zero1", "true", "--train.param_dtype", "bf16"]  # fmt: skip
    r = dry_run(load_config(args), out=lambda s: None).ranks[0]
    assert (r.param_bytes, r.grad_bytes, r.optimizer_bytes) == (2 * r.params, 4 * r.params, 12 * -(-r.params // 4))


def _mtp_args(*extra):
    return ["--model.n_layers", "4", "--model.d_model", "32", "--model.n_heads", "4", "--model.vocab_size", "64",
            "--model.seq_len", "16", "--train.global_batch", "4", "--train.micro_batch", "1",
            "--train.objective", "mtp", *extra]  # fmt: skip


def test_mtp_modules_count_on_the_last_stage():
    """pp 2 with 2 sequential MTP modules: the last stage (1 layer + the modules; stage balance costs a module as a
    layer) adds the tally's MTP term (engine.scaling.activations.mtp_terms, checked against saved tensors in
    tests/scaling/test_activation_tally_mtp.py) and the modules' autocast copies; the first stage has none."""
    from engine.model.gpt import resolve
    from engine.scaling.activations import autocast_weight_bytes, mtp_terms, rank_activation_bytes

    cfg = load_config(_mtp_args("--objective.mtp_depth", "2", "--parallel.pp", "2"))
    report = dry_run(cfg, out=lambda s: None)
    m = resolve(cfg.model)
    first, last = report.ranks
    assert first.activation_bytes == rank_activation_bytes(m, 1, 3, last_stage=False, in_flight_microbatches=2)
    plain = rank_activation_bytes(m, 1, 1, first_stage=False)  # 1f1b: one micro-batch in flight on the last stage
    mtp = sum(mtp_terms(m, 16, 2).values()) + autocast_weight_bytes(m, 1, mtp_depth=2) - autocast_weight_bytes(m, 1)
    assert last.activation_bytes == plain + mtp > plain


def test_parallel_heads_count_one_head_at_a_time_where_the_step_does(monkeypatch):
    """Parallel heads without data parallelism: TrainStep backpropagates them one at a time (per_head_backward),
    so the dry run counts that peak; at dp 2 (DDP) they are all alive at once."""
    from engine.model.gpt import resolve
    from engine.scaling.activations import rank_activation_bytes

    args = _mtp_args("--objective.mtp_depth", "3", "--objective.mtp_kind", "parallel")
    m = resolve(load_config(args).model)
    one = dry_run(load_config(args), out=lambda s: None).ranks[0].activation_bytes
    assert one == rank_activation_bytes(m, 1, 4, mtp_depth=3, mtp_kind="parallel", mtp_per_head=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    ddp = dry_run(load_config(args), out=lambda s: None).ranks[0].activation_bytes
    assert ddp == rank_activation_bytes(m, 1, 4, mtp_depth=3, mtp_kind="parallel") > one
