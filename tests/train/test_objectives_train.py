"""`--train.objective fim|mlm|mtp|prefix|span|ul2` through the trainer: the batches each objective makes, training
with falling loss on the embedded corpus through the CLI (span and ul2 with `--model.arch t5`), the same losses at
tp 2 as in one process, checkpoint resumption, and one-line refusals."""

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.data.tokenizer import ByteTokenizer
from engine.metrics import read_metrics
from engine.model.head import IGNORE_INDEX
from engine.objectives.fim import fim_restore
from engine.train import main, train
from engine.training.samples import SequenceLayout, collate
from tests.distributed import run_distributed
from tests.train.conftest import tiny_args
from tests.train.test_train_pp import _close


class _Docs:
    """A stand-in dataset: sample k is three short documents of text, each ending in EOD, packed and cut to 48 + 1
    tokens (the third one cut short, as a packed window's last document is)."""

    def __init__(self, tok):
        self.tok = tok

    def texts(self, k):
        return [f"def f{k}(x):\n    return x + {k}", f"# note {k} é", f"value_{k} = {k * 7}"]

    def __getitem__(self, k):
        ids = [i for t in self.texts(k) for i in (*self.tok.encode(t), self.tok.eod_id)]
        return {"tokens": np.array(ids[:49], dtype=np.int64)}


def _layout(objective, **kw):
    cfg = load_config(["--train.objective", objective, *[x for k, v in kw.items() for x in (f"--{k}", str(v))]])
    return SequenceLayout.from_config(cfg, ByteTokenizer(), 0)


def test_fim_batches_restore_their_documents():
    tok, ds = ByteTokenizer(), _Docs(ByteTokenizer())
    layout = _layout("fim", **{"objective.fim_rate": 1.0})
    x, y, kwargs = collate(ds, [3, 4], torch.device("cpu"), layout)
    assert kwargs == {} and x.shape == y.shape
    for row, k in enumerate((3, 4)):
        ids = torch.cat([x[row, :1], y[row]]).tolist()  # the transformed sample, whole
        ids = [i if i != IGNORE_INDEX else tok.fim_pad_id for i in ids]
        docs, cur = [], []
        for i in ids:
            if i == tok.eod_id:
                docs.append(fim_restore(cur, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.decode))
                cur = []
            elif i != tok.fim_pad_id:
                cur.append(i)
        # Every whole document transformed (rate 1) and restorable; the sentinels push the last one past the end.
        assert len(docs) == 2 and docs == ds.texts(k)[:2]
        assert tok.fim_prefix_id in ids
    # The same sample index gives the same transform, whatever batch it is in.
    x2, y2, _ = collate(ds, [4], torch.device("cpu"), layout)
    assert torch.equal(x2[0], x[1]) and torch.equal(y2[0], y[1])


def test_fim_padding_is_never_a_label(monkeypatch):
    """A sample that came out shorter (BPE pieces re-encoded) is padded with fim_pad: those positions carry no loss."""
    from engine.objectives import sample_objective

    tok = ByteTokenizer()
    shortened = lambda tokens, *a: np.concatenate([tokens[:-3], [tok.fim_pad_id] * 3])  # noqa: E731
    monkeypatch.setattr(sample_objective, "fim_packed", shortened)
    x, y = _layout("fim").objective(np.arange(10), 7)
    assert x.tolist() == [0, 1, 2, 3, 4, 5, 6, tok.fim_pad_id, tok.fim_pad_id]
    assert y.tolist() == [1, 2, 3, 4, 5, 6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_mlm_batches_are_bidirectional_with_labels_at_the_masked_positions():
    tok, ds = ByteTokenizer(), _Docs(ByteTokenizer())
    x, y, kwargs = collate(ds, list(range(40)), torch.device("cpu"), _layout("mlm"))
    assert kwargs == {"causal": False}
    selected = y != IGNORE_INDEX
    original = torch.stack([torch.from_numpy(ds[k]["tokens"][:-1]) for k in range(40)])
    assert torch.equal(y[selected], original[selected])  # labels: the original tokens where selected
    assert torch.equal(x[~selected], original[~selected])  # elsewhere the inputs are unchanged
    eligible = original != tok.eod_id
    rate = selected.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.01 and not selected[~eligible].any()
    assert (x[selected] == tok.mask_id).float().mean().item() == pytest.approx(0.8, abs=0.06)


def test_prefix_batches_carry_each_rows_prefix_and_labels_after_it():
    ds = _Docs(ByteTokenizer())
    layout = _layout("prefix", **{"objective.prefix_min_frac": 0.25, "objective.prefix_max_frac": 0.75})
    x, y, kwargs = collate(ds, [3, 4, 5], torch.device("cpu"), layout)
    assert sorted(kwargs) == ["prefix_lengths"] and kwargs["prefix_lengths"].shape == (3,)
    for row, k in enumerate((3, 4, 5)):
        p = int(kwargs["prefix_lengths"][row])
        tokens = torch.from_numpy(ds[k]["tokens"])
        assert 12 <= p <= 36 and torch.equal(x[row], tokens[:-1])
        assert (y[row, : p - 1] == IGNORE_INDEX).all() and torch.equal(y[row, p - 1 :], tokens[p:])
    x2, y2, kw2 = collate(ds, [5], torch.device("cpu"), layout)  # per sample, whatever the batch
    assert torch.equal(y2[0], y[2]) and kw2["prefix_lengths"].tolist() == [kwargs["prefix_lengths"][2]]


def test_span_batches_carry_the_decoder_inputs_and_rebuild_their_windows(tiny_data):
    """Through collate: encoder inputs (b, seq_len), labels and `decoder_inputs` (b, targets length); each row's
    targets, de-sentinelled into its encoder input, give back the sample's raw tokens."""
    from engine.objectives.span_corruption import restore_spans
    from engine.training.samples import SampleStream

    tok = ByteTokenizer()
    layout = _layout("span", **{"model.arch": "t5", "model.seq_len": 32})
    stream = SampleStream(tiny_data[0], layout.stream_seq_len(32), 1234, tok.vocab_size)
    x, y, kwargs = collate(stream, [0, 1, 2], torch.device("cpu"), layout)
    dec = kwargs.pop("decoder_inputs")
    assert kwargs == {} and x.shape == (3, 32) and y.shape == dec.shape == (3, layout.objective.mixture.decoder_length)
    for row in range(3):
        targets = y[row][y[row] != IGNORE_INDEX].numpy()
        assert dec[row, 0] == tok.bos_id and torch.equal(dec[row, 1 : len(targets)], y[row, : len(targets) - 1])
        text = restore_spans(x[row].numpy(), targets, tok.sentinel_ids, tok.eod_id)
        assert (text == stream[row]["tokens"][: len(text)]).all() and len(text) == layout.stream_seq_len(32) + 1


T5 = dict(model__arch="t5")


@pytest.mark.parametrize("objective", ["fim", "mlm", "mtp", "prefix", "span", "ul2"])
def test_each_objective_trains_on_the_embedded_corpus_through_the_cli(tmp_path, objective, capsys):
    extra = dict(T5, optim__lr=6e-3) if objective in ("span", "ul2") else {}
    args = tiny_args(tmp_path / objective, "embedded", "", train__objective=objective, train__steps=50,
                     optim__decay_steps=50, eval__every=25, checkpoint__every=0, **extra)  # fmt: skip
    args[args.index("--data.valid_path") + 1] = ""
    assert main(args) == 0, capsys.readouterr().err
    recs = read_metrics(tmp_path / objective / "metrics.jsonl")
    vals = {r["step"]: r["val_loss"] for r in recs if r.get("val_loss") is not None}
    losses = [r["loss"] for r in recs if r.get("loss") is not None]
    assert sorted(vals) == [0, 25, 50] and vals[50] < vals[0] - 1.0, vals
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0


TP_OBJECTIVES = ("fim", "mlm", "mtp", "prefix", "span", "ul2")
# Sequence parallelism: multi-token prediction's modules run on each rank's sequence shard (two depths, so the second
# reads the first's sharded output; both kinds); t5's encoder and decoder each on theirs, the cross-attention
# gathering both.
MTP2 = dict(train__objective="mtp", objective__mtp_depth=2)
TP2, SP = dict(parallel__tp=2), dict(parallel__tp=2, parallel__sp="true")
CP2 = dict(parallel__cp=2)  # mtp: each depth's ids and labels shifted before the cut into the ranks' chunks
TP_CASES = {
    **{objective: (TP2, objective) for objective in TP_OBJECTIVES},
    "mtp sp sequential": (SP, "mtp2 sequential"),
    "mtp sp parallel": (SP, "mtp2 parallel"),
    "span sp": (SP, "span"),
    "ul2 sp": (SP, "ul2"),
    "span sp, odd decoder length": (SP, "span seq 36"),
    "mtp cp sequential": (CP2, "mtp2 sequential"),
    "mtp cp parallel": (CP2, "mtp2 parallel"),
    "mlm cp": (CP2, "mlm"),  # the ring attention without the causal mask
    "mlm cp all-to-all": (dict(CP2, parallel__cp_impl="alltoall"), "mlm"),
    "span cp": (CP2, "span"),  # the encoder's and the decoder's sequences each cut into chunks, the decoder's padded
    "ul2 cp all-to-all": (dict(CP2, parallel__cp_impl="alltoall"), "ul2"),
    "span cp, odd decoder length": (CP2, "span seq 36"),
    "span cp all-to-all": (dict(CP2, parallel__cp_impl="alltoall"), "span"),  # 8 decoder tokens, 32 encoder ones
    "prefix cp all-to-all": (dict(CP2, parallel__cp_impl="alltoall"), "prefix"),
    "prefix cp": (CP2, "prefix"),  # the ring: keys after the queries visible up to each row's prefix
}  # label: (the layout's flags, the objective's flags in OBJECTIVE_ARGS)
OBJECTIVE_ARGS = {
    **{o: dict(T5, train__objective=o) if o in ("span", "ul2") else dict(train__objective=o) for o in TP_OBJECTIVES},
    "mtp2 sequential": MTP2,
    "mtp2 parallel": dict(MTP2, objective__mtp_kind="parallel"),
    # 9 targets at seq_len 36: the samples' decoder length is padded to 10 under sp, which must not change the loss
    "span seq 36": dict(T5, train__objective="span", model__seq_len=36),
}  # span and ul2 train the t5 encoder-decoder (at tp 2: its cross-attention split by heads as the self-attention)


def _tp_worker(rank, world, root, data):
    from pathlib import Path

    import torch.distributed as dist

    out = {}
    for i, (label, (layout, objective)) in enumerate(TP_CASES.items()):
        cfg = load_config(tiny_args(Path(root) / f"tp2_{i}", *data, **OBJECTIVE_ARGS[objective], **layout,
                                    eval__every=0, checkpoint__every=0))  # fmt: skip
        result = train(cfg)
        out[label] = (result.losses, result.grad_norms)
        dist.barrier()
    return out


@pytest.mark.distributed
def test_objectives_at_tp2_sp_and_cp2_give_the_one_process_losses(tmp_path, tiny_data):
    got = run_distributed(_tp_worker, 2, str(tmp_path), tiny_data, timeout=240)
    one = {}
    for objective in {objective for _, objective in TP_CASES.values()}:
        result = train(load_config(tiny_args(tmp_path / f"one_{len(one)}", *tiny_data, **OBJECTIVE_ARGS[objective],
                                             eval__every=0, checkpoint__every=0)))  # fmt: skip
        one[objective] = (result.losses, result.grad_norms)
    for label, (_, objective) in TP_CASES.items():
        for m, what in enumerate(("loss", "grad norm")):
            want = one[objective][m]
            assert want, (label, what)
            for rank in (0, 1):
                _close(got[rank][label][m], want, f"{label} {what} rank {rank}")


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(train__objective="t5"), "train.objective must be one of clm|fim|mlm|mtp|prefix|span|ul2"),
        (dict(train__objective="span"), "train.objective span trains an encoder-decoder: use --model.arch t5 (or"),
        (dict(T5, train__objective="clm"), "model.arch t5 (an encoder-decoder) trains with train.objective span or"),
        (dict(T5, train__objective="ul2", objective__ul2_s_rate=-0.5), "objective.ul2_s_rate -0.5 is outside [0, 1]"),
        (dict(T5, train__objective="span", parallel__pp=2), "model.arch t5 with parallel.pp > 1 is not supported"),
        (dict(T5, train__objective="ul2", model__seq_len=1024), "more than the tokenizer's 100 sentinel ids"),
        (dict(train__objective="fim", objective__fim_rate=1.5), "objective.fim_rate 1.5 is outside [0, 1]"),
        (dict(train__objective="prefix", objective__prefix_max_frac=1.5), "objective.prefix_max_frac 1.5 is outside"),
        (dict(train__objective="mtp", objective__mtp_depth=0), "objective.mtp_depth must be a positive integer, got 0"),
        (dict(train__objective="mtp", objective__mtp_lambda=-1), "objective.mtp_lambda must be >= 0, got -1.0"),
    ],
)
def test_bad_objectives_are_one_line_errors(tmp_path, tiny_data, capsys, kw, needle):
    assert main(tiny_args(tmp_path / "run", *tiny_data, **kw)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


RESUMABLE = {
    "mtp_sequential": dict(train__objective="mtp", objective__mtp_depth=2, objective__mtp_kind="sequential"),
    "mtp_parallel": dict(train__objective="mtp", objective__mtp_depth=2, objective__mtp_kind="parallel"),
    "t5_span": dict(T5, train__objective="span"),
    "t5_ul2": dict(T5, train__objective="ul2"),
}


@pytest.mark.parametrize("case", sorted(RESUMABLE))
def test_models_beyond_gpt_are_checkpointed_and_resumed(tmp_path, tiny_data, case):
    """A run stopped at step 3 and resumed gives the straight run's losses: the MTP modules, or the t5 encoder and
    decoder (and their optimizer state, and the denoising samples of each data position) come back from the
    checkpoint, not from a fresh initialisation."""
    kw = dict(RESUMABLE[case], eval__every=0, checkpoint__every=3)
    straight = train(load_config(tiny_args(tmp_path / "straight", *tiny_data, **kw))).losses
    train(load_config(tiny_args(tmp_path / "resumed", *tiny_data, train__steps=3, **kw)))
    resumed = train(load_config(tiny_args(tmp_path / "resumed", *tiny_data, **kw))).losses
    assert sorted(resumed) == [4, 5, 6]
    for s in (4, 5, 6):
        assert resumed[s] == pytest.approx(straight[s], rel=1e-6), s
