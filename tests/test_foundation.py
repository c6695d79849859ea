"""The foundation: config loading and errors, the gloo test runner, embeddability of the packages."""

import subprocess
import sys

import pytest

from engine.config import Config, ConfigError, load_config
from tests.distributed import run_distributed


def test_defaults_and_overrides():
    cfg = load_config(["--model.n_layers", "6", "--optim.lr=0.01", "--parallel.sp", "true", "--resume", "never"])
    assert cfg.model.n_layers == 6 and cfg.optim.lr == 0.01 and cfg.parallel.sp is True
    assert cfg.resume == "never"
    assert Config().model.n_layers == 4


def test_toml_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[model]\nn_layers = 2\nd_model = 64\n[checkpoint]\nasync = true\n")
    cfg = load_config(["--config", str(f), "--model.n_layers", "3"])
    assert cfg.model.n_layers == 3 and cfg.model.d_model == 64 and cfg.checkpoint.async_ is True


def test_to_toml_round_trip(tmp_path):
    cfg = load_config(["--model.arch", "gpt2", "--data.path", '0.7 a "b" 0.3 c', "--checkpoint.async", "true"])
    f = tmp_path / "out.toml"
    f.write_text(cfg.to_toml())
    assert load_config(["--config", str(f)]) == cfg


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model.n_layer", "2"], "did you mean 'model.n_layers'"),
        (["--modle.n_layers", "2"], "did you mean 'model'"),
        (["--model.n_layers", "two"], "takes an integer"),
        (["--parallel.sp", "yes"], "takes true or false"),
        (["--optim.schedule", "linear"], "must be one of cosine|wsd|inverse_sqrt|constant"),
        (["--train.steps"], "needs a value"),
        (["train.steps", "3"], "unexpected argument"),
        (["--config", "/nonexistent.toml"], "does not exist"),
        (["--config", "/"], "is a directory, not a TOML file"),
        (["--model.d_model", "--run.dir", "x"], "flag --model.d_model needs a value, got the flag --run.dir instead"),
        (["--model", "3"], "is a section"),
    ],
)
def test_bad_config_is_one_line_error(argv, message):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_toml_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model]\nn_layers = \n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(["--config", str(f)])
    f.write_text("[model]\nnlayers = 2\n")
    with pytest.raises(ConfigError, match="bad.toml: unknown config key 'model.nlayers'"):
        load_config(["--config", str(f)])


def _all_reduce_rank(rank, world_size):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


@pytest.mark.distributed
def test_run_distributed_collects_results():
    assert run_distributed(_all_reduce_rank, 2) == [1.0, 1.0]


@pytest.mark.distributed
def test_run_distributed_surfaces_child_traceback():
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed.*ValueError: boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)


def test_import_is_lazy_and_gpu_free():
    code = (
        "import sys, engine, kernels, engine.data, engine.parallel;"
        "assert 'triton' not in sys.modules, 'triton imported';"
        "assert 'torch.distributed.distributed_c10d' not in sys.modules or "
        "not __import__('torch').distributed.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernel_exports_are_functions_after_submodule_imports():
    # A submodule named like a public function would shadow it as a package attribute once imported.
    import importlib
    import pkgutil

    import kernels

    for mod in pkgutil.iter_modules(kernels.__path__):
        importlib.import_module(f"kernels.{mod.name}")
    for name in kernels.__all__:
        obj = getattr(kernels, name)
        assert callable(obj) and not isinstance(obj, type(kernels)), name


def test_parallel_exports_resolve():
    import engine.parallel

    for name in engine.parallel.__all__:
        assert getattr(engine.parallel, name) is not None, name
