"""`python -m engine.convert`: a checkpoint saved at tp 2 exports as the one saved at tp 1 did, and bad input is one
line with exit status 2. Hugging Face directories here are written by our own `to_hf` (no transformers needed)."""

import json
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.convert import ConvertError, from_hf, to_hf
from engine.convert.__main__ import main
from engine.convert.hf_files import read_weights
from engine.model.gpt import GPT
from tests.distributed import run_distributed

# An odd vocabulary: the tp 2 vocab-parallel embedding pads it, and the checkpoint must drop that padding.
CFG = ModelConfig(arch="gpt2", n_layers=2, d_model=32, n_heads=4, vocab_size=301, seq_len=16, tie_embeddings=True,
                  kernels="torch")  # fmt: skip


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    to_hf(GPT(CFG, seed=5), CFG, path)
    return path


def _reshard_worker(rank, world, run_dir):
    """Loads step 0 (saved by one process) into a tp 2 model and saves it as step 1 at tp 2, with the trainer's
    own restore and save: each rank writes its slices. Returns (the embedding was sliced, to_hf refused the
    module)."""
    from engine.checkpoint.reader import CheckpointReader
    from engine.checkpoint.training_state import restore_training_state, save_training_state
    from engine.config import load_config
    from engine.optim.distributed import build_training_optimizer
    from engine.parallel.dims import ParallelDims
    from engine.parallel.parallelize import parallelize_gpt
    from engine.parallel.sharding import sharding_of

    cfg = load_config(["--config", f"{run_dir}/config.toml", "--parallel.tp", "2"])
    dims = ParallelDims.from_world(tp=2)
    with torch.device("meta"):
        model = GPT(cfg.model)
    [chunk] = parallelize_gpt(model, dims, cfg, device="cpu")
    opt = build_training_optimizer(chunk, cfg.optim)
    layout = {**dims.as_dict(), "sp": False, "virtual_stages": 1}
    common = dict(chunks=[chunk], optimizer=opt, sharding=sharding_of(chunk), scaler=None, rng_trackers=[None],
                  device=torch.device("cpu"))  # fmt: skip
    reader = CheckpointReader(Path(run_dir) / "checkpoints" / "step_00000000")
    restore_training_state(reader, layout=layout, rank=rank, **common)
    sliced = chunk.tok_emb.weight.shape[0] < CFG.vocab_size
    meta = {"consumed_samples": 0, "layout": layout, "config": cfg.to_dict()}
    save_training_state(Path(run_dir) / "checkpoints", 1, meta=meta, toml=cfg.to_toml(), keep=0,
                        tp_rank=dims.rank_in("tp"), dp_rank=0, **common)  # fmt: skip
    try:  # a tp module is no plain GPT: its checkpoint is the way out
        to_hf(chunk, cfg.model, Path(run_dir) / f"refused{rank}")
        refused = False
    except ConvertError as e:
        refused = "convert a sharded run through its checkpoint" in str(e)
    dims.destroy()
    return sliced, refused


@pytest.mark.distributed
@pytest.mark.slow  # 10 s on 2 cores, nearly all of it two spawned processes importing torch
def test_a_tp2_checkpoint_exports_the_tp1_one(hf_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["from-hf", str(hf_dir), str(run), "--data.tokenizer", "byte"]) == 0
    assert run_distributed(_reshard_worker, 2, str(run), timeout=120) == [(True, True)] * 2  # each held a slice
    manifest = json.loads((run / "checkpoints" / "step_00000001" / "manifest.json").read_text())
    assert len(manifest["tensors"]["tok_emb.weight"]["shards"]) == 2
    assert manifest["layout"]["tp"] == 2
    assert main(["to-hf", str(run / "checkpoints" / "step_00000000"), str(tmp_path / "tp1")]) == 0
    assert main(["to-hf", str(run), str(tmp_path / "tp2")]) == 0  # the latest: step 1, saved at tp 2
    one, two = read_weights(tmp_path / "tp1"), read_weights(tmp_path / "tp2")
    assert set(one) == set(two) == set(read_weights(hf_dir))
    for name in one:
        assert torch.equal(one[name], two[name]), name
    tokens = torch.arange(32).view(2, 16) * 7 % CFG.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(from_hf(tmp_path / "tp2")[0](tokens), from_hf(hf_dir)[0](tokens),
                                   rtol=0, atol=0)  # fmt: skip


def test_sharded_bf16_input_config_file_and_a_bf16_export(hf_dir, tmp_path, capsys):
    """Shards listed by model.safetensors.index.json, stored in bf16, come in as fp32 (the same values); a --config
    file's [model] shape is refused like a flag; to-hf --dtype bf16 writes bf16."""
    from safetensors.torch import save_file

    tensors = read_weights(hf_dir)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    weight_map = {n: f for f, part in shards.items() for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f, part in shards.items():
        save_file({n: tensors[n].to(torch.bfloat16) for n in part}, str(sharded / f))
    model, _ = from_hf(sharded)
    ref, _ = from_hf(hf_dir)
    for (name, t), r in zip(model.state_dict().items(), ref.state_dict().values()):
        assert t.dtype == torch.float32 and torch.equal(t, r.to(torch.bfloat16).float()), name
    toml = tmp_path / "shape.toml"
    toml.write_text("[model]\nn_layers = 3\n")
    assert main(["from-hf", str(sharded), str(tmp_path / "run"), f"--config={toml}"]) == 2
    assert "model.n_layers comes from" in capsys.readouterr().err
    assert main(["from-hf", str(sharded), str(tmp_path / "run"), "--data.tokenizer", "byte"]) == 0
    assert main(["to-hf", str(tmp_path / "run"), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    written = read_weights(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, tensors[n].to(torch.bfloat16)) for n, t in written.items())
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConvertError, match=r"listed in model.safetensors.index.json\) is missing"):
        from_hf(sharded)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line(hf_dir, tmp_path, capsys):
    assert "does not exist" in _error(capsys, ["from-hf", str(tmp_path / "nowhere"), str(tmp_path / "run")])
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    assert "model_type 'bert' is not supported" in _error(capsys, ["from-hf", str(bert), str(tmp_path / "run")])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    assert "has no model.safetensors" in _error(capsys, ["from-hf", str(bare), str(tmp_path / "run")])
    shaped = ["from-hf", str(hf_dir), str(tmp_path / "run"), "--model.d_model", "64"]
    assert "model.d_model comes from" in _error(capsys, shaped)
    assert "model.seq_len comes from" in _error(capsys, [*shaped[:3], "--model.seq_len", "8"])  # learned positions
    assert main(["from-hf", str(hf_dir), str(tmp_path / "run"), "--model.dropout", "0.1"]) == 0
    # no tokenizer.json and a vocabulary below the default BPE's: the conversion says how to make the run trainable
    assert "--data.tokenizer (byte, or a tokenizer.json)" in capsys.readouterr().out
    assert "already holds checkpoints" in _error(capsys, ["from-hf", str(hf_dir), str(tmp_path / "run")])
    assert "already holds a model" in _error(capsys, ["to-hf", str(tmp_path / "run"), str(hf_dir)])
    assert "does not exist" in _error(capsys, ["to-hf", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    with pytest.raises(ConvertError, match="model_type 'bert'"):
        from_hf(bert)
    scaled = json.loads((hf_dir / "config.json").read_text())
    for key, value, message in (("activation_function", "gelu", "activation_function 'gelu'"),
                                ("n_layer", 3, "has no tensor 'transformer.h.2.ln_1.weight'")):  # fmt: skip
        (bare / "config.json").write_text(json.dumps({**scaled, key: value}))
        (bare / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
        with pytest.raises(ConvertError, match=message):
            from_hf(bare)


def test_llama_refusals_name_the_key(tmp_path):
    from engine.convert.hf_config import model_config_from_hf

    base = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
            "intermediate_size": 64, "vocab_size": 100}  # fmt: skip
    assert model_config_from_hf(base).rope_theta == 10000.0
    for extra, message in (({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3'"),
                           ({"attention_bias": True}, "attention_bias true"), ({"head_dim": 16}, "head_dim 16"),
                           ({"hidden_act": "gelu"}, "hidden_act 'gelu'")):  # fmt: skip
        with pytest.raises(ConvertError, match=message):
            model_config_from_hf({**base, **extra})
    cfg = ModelConfig(arch="llama", n_layers=1, d_model=32, n_heads=4, vocab_size=100, window=8)
    with pytest.raises(ConvertError, match="sliding-window"):
        to_hf(GPT(cfg, seed=0), cfg, tmp_path)


def _small_tokenizer(path: Path) -> int:
    """A 280-id byte-level BPE tokenizer.json with only <|endoftext|> among our reserved names; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([Path(__file__).read_text()] * 4, trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


def test_a_tokenizer_needing_reserved_ids_pads_the_vocab_and_to_hf_slices_it_back(tmp_path, tiny_data):
    """HF_DIR's tokenizer.json lacks our reserved roles: from-hf pads the vocabulary with zero rows (the trainer
    adds those ids), the trainer runs on it, and to-hf gives back the Hugging Face vocabulary and tokenizer."""
    from engine.config import load_config
    from engine.convert.run_dir import read_checkpoint
    from engine.data.tokenizer import load_tokenizer_json
    from engine.train import main as train_main

    hf = tmp_path / "hf"
    hf.mkdir()
    vocab = _small_tokenizer(hf / "tokenizer.json")
    cfg = ModelConfig(**{**vars(CFG), "vocab_size": vocab})
    to_hf(GPT(cfg, seed=6), cfg, hf)
    needed = load_tokenizer_json(str(hf / "tokenizer.json")).vocab_size
    assert needed > vocab
    run = tmp_path / "run"
    flags = ["--data.path", tiny_data[0], "--eval.every", "0", "--train.global_batch", "4", "--train.steps", "1",
             "--run.progress", "false", "--run.tensorboard", "false"]  # fmt: skip
    assert main(["from-hf", str(hf), str(run), *flags]) == 0
    saved = load_config(["--config", str(run / "config.toml")])
    assert saved.model.vocab_size == needed and saved.data.tokenizer == str((run / "hf" / "tokenizer.json").resolve())
    assert train_main(["--config", str(run / "config.toml")]) == 0
    state, _, ckpt = read_checkpoint(run)
    assert ckpt.name == "step_00000001" and state["tok_emb.weight"].shape[0] == needed
    assert main(["to-hf", str(run), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == vocab
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    exported, _ = from_hf(tmp_path / "out")
    trained, _ = from_hf(tmp_path / "out", vocab_size=needed)  # zero rows again: the checkpoint's, less its own
    trained.tok_emb.weight.data.copy_(state["tok_emb.weight"])
    tokens = torch.arange(32).view(2, 16) * 7 % vocab
    with torch.no_grad():
        assert torch.equal(exported(tokens), trained(tokens)[..., :vocab])
