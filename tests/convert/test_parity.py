"""Logit parity with transformers both ways (fp32), for a Llama (GQA, untied head, RoPE) and a GPT-2 (tied
embeddings, learned positions, Conv1D weights, biases, tanh GELU), and the exact round trip of a trained checkpoint
through to-hf and from-hf."""

import pytest
import torch

from engine.convert import from_hf, to_hf
from engine.convert.__main__ import main as convert_main
from engine.convert.hf_files import read_weights
from engine.convert.run_dir import read_checkpoint
from tests.convert.hf_models import VOCAB, save_gpt2, save_llama

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["llama", "llama_tied", "gpt2"])
def hf_model(request, tmp_path_factory):
    """(arch, tied, directory, transformers model): Llama untied (and tied, as Llama 3.2 1B), GPT-2 tied."""
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        return "gpt2", True, path, save_gpt2(path)
    tied = request.param == "llama_tied"
    return "llama", tied, path, save_llama(path, tie_word_embeddings=tied)


def _tokens(seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(3))


def test_from_hf_gives_transformers_logits(hf_model):
    arch, tied, path, hf = hf_model
    model, cfg = from_hf(path)
    assert (cfg.arch, cfg.vocab_size, cfg.tie_embeddings) == (arch, VOCAB, tied)
    assert cfg.n_kv_heads == (2 if arch == "llama" else 4)
    tokens = _tokens()
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == (2, 24, VOCAB)
    assert theirs.abs().max() > 1.0  # logits big enough for the tolerance to mean something
    torch.testing.assert_close(ours, theirs, **TOL)


def test_to_hf_loads_in_transformers_with_the_same_logits(hf_model, tmp_path):
    arch, tied, path, hf = hf_model
    model, cfg = from_hf(path)
    to_hf(model, cfg, tmp_path)
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.GPT2LMHeadModel
    back = cls.from_pretrained(tmp_path).eval()
    assert back.config.tie_word_embeddings == tied
    if arch == "llama":
        assert back.config.rope_parameters["rope_theta"] == 500000.0 and back.config.num_key_value_heads == 2
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, model(tokens), **TOL)
    # the Hugging Face tensors themselves come back exactly (Conv1D transposes, fused qkv, names)
    original, written = read_weights(path), read_weights(tmp_path)
    assert set(written) <= set(original)
    for name, t in written.items():
        assert torch.equal(t, original[name]), name


def test_trained_checkpoint_round_trips_exactly_and_keeps_parity(tmp_path, tiny_data):
    """from-hf -> the trainer's own steps -> to-hf -> from-hf: the checkpoint's tensors exactly, and
    transformers' logits from the exported directory equal ours from the checkpoint."""
    from engine.train import main as train_main

    save_llama(tmp_path / "hf", vocab_size=400)  # the byte tokenizer's 375 ids fit
    run = tmp_path / "run"
    train_prefix, valid_prefix = tiny_data
    flags = ["--data.path", train_prefix, "--data.valid_path", valid_prefix, "--data.tokenizer", "byte",
             "--train.global_batch", "4", "--train.steps", "2", "--eval.every", "0", "--model.seq_len", "32",
             "--run.progress", "false", "--run.tensorboard", "false", "--optim.lr", "0.01"]  # fmt: skip
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(run), *flags]) == 0
    assert train_main(["--config", str(run / "config.toml")]) == 0
    state, cfg, ckpt = read_checkpoint(run)
    assert ckpt.name == "step_00000002"
    assert convert_main(["to-hf", str(run), str(tmp_path / "out")]) == 0
    model, model_cfg = from_hf(tmp_path / "out")
    assert model_cfg == cfg.model
    back = {n: t for n, t in model.state_dict().items() if n in state}
    assert set(back) == set(state)
    for name, t in state.items():
        assert torch.equal(back[name], t), name
    start, _ = from_hf(tmp_path / "hf")
    assert not torch.equal(start.tok_emb.weight, model.tok_emb.weight)  # the steps did train
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = _tokens(32)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), **TOL)
