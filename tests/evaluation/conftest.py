"""A tiny byte-level run trained for 6 steps (validation at steps 0, 3 and 6), shared by the evaluation tests."""

import pytest

from engine.config import load_config
from engine.train import train
from tests.train.conftest import build_tiny_data, tiny_args


@pytest.fixture(autouse=True)
def _private_engine_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path_factory.getbasetemp() / "engine_cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[str, str]:
    return build_tiny_data(tmp_path_factory.mktemp("evaluation_data"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_data):
    """(run directory, TrainResult) of the tiny run; its last checkpoint is step 6."""
    run_dir = tmp_path_factory.mktemp("evaluation_run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGINE_CACHE", str(tmp_path_factory.getbasetemp() / "engine_cache"))
        result = train(load_config(tiny_args(run_dir, *tiny_data)))
    return run_dir, result
