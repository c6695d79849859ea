"""Validation loss per blend component (engine.training.evaluate): from the eval pass itself, logged as
`val_loss/<component>`, the same under data parallelism as in one process."""

import contextlib

import pytest
import torch

from engine.config import ModelConfig, load_config
from engine.metrics import read_metrics
from engine.model import GPT
from engine.train import train
from engine.training.evaluate import evaluate
from engine.training.samples import eval_dataset
from tests.distributed import run_distributed
from tests.train.blend_data import build_domain_data
from tests.train.conftest import tiny_args


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return build_domain_data(tmp_path_factory.mktemp("domains"))


class _Unblended:
    """The blend's samples without its index arrays: evaluate sees one dataset and makes one pass."""

    def __init__(self, ds):
        self.ds = ds

    def __getitem__(self, k):
        return self.ds[k]

    def __len__(self):
        return len(self.ds)


def test_component_losses_match_separate_evaluation_and_average_to_the_overall(domains):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=256, seq_len=32, kernels="torch"))
    blend = f"3 {domains['code_valid']} 1 {domains['noise_valid']}"
    ds = eval_dataset(blend, 16, 32, 1234, 256)  # 2 global batches of 8, micro 2: mixed micro-batches
    args = (2, 8, 2, 0, 1, torch.device("cpu"), contextlib.nullcontext)
    val = evaluate(model, ds, *args)
    assert list(val.components) == ["code_valid", "noise_valid"]
    assert val.component_tokens == {"code_valid": 12 * 32, "noise_valid": 4 * 32}  # 3:1 of 16 samples
    # each component's loss, computed sample by sample from the blend's own record of where each sample came from
    with torch.no_grad():
        for c, name in enumerate(val.components):
            rows = [k for k in range(16) if ds[k]["dataset_id"] == c]
            tokens = torch.stack([torch.as_tensor(ds[k]["tokens"]) for k in rows])
            expected = model(tokens[:, :-1], tokens[:, 1:], reduction="sum").item() / tokens[:, 1:].numel()
            assert val.components[name] == pytest.approx(expected, rel=1e-6)
    weighted = sum(val.components[n] * val.component_tokens[n] for n in val.components)
    assert val == pytest.approx(weighted / sum(val.component_tokens.values()), rel=1e-12)
    assert val == pytest.approx(evaluate(model, _Unblended(ds), *args), rel=1e-6)  # the plain pass's overall loss
    assert val.metrics() == {f"val_loss/{n}": v for n, v in val.components.items()}


def _train_blend(root, domains, **kw):
    """3 steps on a 1:1 blend, validated on a 1:1 blend of the held-out splits; {step: (loss, components)}."""
    argv = tiny_args(root, f"1 {domains['code_train']} 1 {domains['noise_train']}",
                     f"1 {domains['code_valid']} 1 {domains['noise_valid']}", train__steps=3, eval__every=3,
                     checkpoint__every=0, optim__decay_steps=3, **kw)  # fmt: skip
    res = train(load_config(argv))
    return {step: (float(v), dict(v.components), dict(v.component_tokens)) for step, v in res.val_losses.items()}


def _two_rank_worker(rank, world, root, domains):
    """dp 2, then pp 2 (evaluate_pipeline: one masked pass per component)."""
    from pathlib import Path

    dp2 = _train_blend(Path(root) / "dp2", domains)
    return dp2, _train_blend(Path(root) / "pp2", domains, parallel__pp=2, train__micro_batch=2)


@pytest.mark.distributed
def test_per_component_val_loss_is_logged_and_the_same_under_dp_2_and_pp_2(tmp_path, domains):
    single = _train_blend(tmp_path / "single", domains)
    assert set(single) == {0, 3}
    for val, components, tokens in single.values():
        assert set(components) == {"code_valid", "noise_valid"}
        weighted = sum(components[n] * tokens[n] for n in components) / sum(tokens.values())
        assert val == pytest.approx(weighted, rel=1e-12)
    assert single[3][1]["code_valid"] < single[0][1]["code_valid"]  # it learned
    records = {r["step"]: r for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if "val_loss" in r}
    for step, (val, components, _) in single.items():
        assert records[step]["val_loss"] == pytest.approx(val)
        assert {k: records[step][k] for k in records[step] if k.startswith("val_loss/")} == pytest.approx(
            {f"val_loss/{n}": v for n, v in components.items()}
        )
    ranks = run_distributed(_two_rank_worker, 2, str(tmp_path), domains, timeout=120)
    assert ranks[0] == ranks[1]  # every rank holds the reduced figures
    for layout in ranks[0]:
        for step, (val, components, tokens) in single.items():
            got_val, got_components, got_tokens = layout[step]
            assert got_tokens == tokens
            assert got_val == pytest.approx(val, rel=1e-5)
            assert got_components == pytest.approx(components, rel=1e-5)
