"""A tiny byte-level dataset for the trainer runs of these tests, and a private ENGINE_CACHE."""

import pytest

from tests.train.conftest import build_tiny_data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[str, str]:
    return build_tiny_data(tmp_path_factory.mktemp("convert_data"))


@pytest.fixture(autouse=True)
def _private_engine_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path_factory.getbasetemp() / "engine_cache"))
