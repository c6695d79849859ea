"""The checkpoint format on its own: round trip, atomic layout, checksums, retention, named optimizer state."""

import json
import random
import re

import numpy as np
import pytest
import torch

from engine.checkpoint.checkpointer import (
    CheckpointError,
    _merge_entries,
    apply_retention,
    complete_checkpoints,
    latest_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
)
from engine.checkpoint.reader import load_checkpoint
from engine.checkpoint.state import (
    capture_rng_state,
    named_to_optimizer_state,
    optimizer_state_to_named,
    restore_rng_state,
)


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(
        [{"params": [model[0].weight, model[1].weight]}, {"params": [model[0].bias, model[1].bias], "weight_decay": 0}]
    )
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    return model, opt


def _save(root, step, model, opt, keep=0):
    names = {id(p): n for n, p in model.named_parameters()}
    otensors, ometa = optimizer_state_to_named(opt, names)
    return save_checkpoint(
        root,
        step,
        tensors={"model": dict(model.state_dict()), "optim": otensors},
        objects={"optim": ometa},
        rank_objects={"rng": capture_rng_state(torch.device("cpu"))},
        meta={"config": {"x": 1}},
        keep=keep,
    )


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = _model_and_optimizer()
    random.seed(3)
    np.random.seed(3)
    path = _save(tmp_path, 5, model, opt)
    expect = (random.random(), np.random.rand(), torch.rand(1))
    assert path.name == "step_00000005" and (tmp_path / "latest").read_text().strip() == "step_00000005"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 5 and manifest["config"] == {"x": 1}
    w = manifest["tensors"]["0.weight"]
    assert w["shape"] == [8, 4] and w["shards"][0]["offsets"] == [0, 0]
    assert all(len(info["sha256"]) == 64 for info in manifest["files"].values())

    model2, opt2 = _model_and_optimizer(seed=1)
    ck = load_checkpoint(path)
    model2.load_state_dict(ck.tensors["model"])
    names2 = {id(p): n for n, p in model2.named_parameters()}
    named_to_optimizer_state(opt2, names2, ck.tensors["optim"], ck.objects["optim"])
    restore_rng_state(ck.rank_objects["rng"], torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])


def test_corrupt_file_is_named(tmp_path):
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 1, model, opt)
    target = path / "model_r00000.pt"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model_r00000.pt is corrupt"):
        load_checkpoint(path)


def test_retention_and_latest(tmp_path):
    model, opt = _model_and_optimizer()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, keep=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    (tmp_path / ".step_00000005.tmp").mkdir()  # an interrupted save is never "complete"
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    (tmp_path / "latest").unlink()  # the pointer is a convenience: the newest complete directory is found without it
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert apply_retention(tmp_path, 1)[0].name == "step_00000003"
    assert resolve_checkpoint_path(tmp_path.parent / tmp_path.name).name == "step_00000004"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_path(tmp_path / "nope")


def test_shards_are_placed_at_their_offsets_and_must_tile_the_tensor(tmp_path):
    full = torch.arange(12.0).reshape(4, 3)

    def save(step, part, offsets, shape=(4, 3)):
        return save_checkpoint(
            tmp_path,
            step,
            tensors={"model": {"w": part}},
            objects={},
            rank_objects={},
            meta={},
            shards={"w": (list(shape), offsets)},
        )

    # One rank's shard that is the whole tensor: written as one shard, loaded as is.
    assert torch.equal(load_checkpoint(save(1, full, [0, 0])).tensors["model"]["w"], full)
    # A slice that leaves rows out is refused at save time, and a manifest whose shards do not tile at load time.
    with pytest.raises(ValueError, match="the shards of w hold 6 of 12 elements"):
        save(2, full[2:], [2, 0])
    path = save(3, full, [0, 0])
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tensors"]["w"]["shape"] = [8, 3]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="its shards hold 12 of 24 elements"):
        load_checkpoint(path, verify=False)

    # The count alone is not enough: a shard outside the bounds, or two that overlap and leave rows 2-3 uncovered.
    with pytest.raises(
        ValueError, match=r"the shards of w include one at offsets \[3, 0\] with shape \[4, 3\], outside"
    ):
        save(4, full, [3, 0])

    def half(offsets):  # one rank's entry for a (2, 3) shard of w, as save_checkpoint gathers them
        shard = {"file": "model_r00000.pt", "offsets": offsets, "shape": [2, 3]}
        return {"w": {"group": "model", "shape": [4, 3], "dtype": "float32", "shards": [shard]}}

    assert len(_merge_entries([half([0, 0]), half([2, 0])])["w"]["shards"]) == 2
    with pytest.raises(ValueError, match=r"the shards of w overlap: offsets \[0, 0\] shape \[2, 3\] and offsets"):
        _merge_entries([half([0, 0]), half([0, 0])])
    # The same problems in a manifest edited by hand: one line naming the tensor, before any file is read.
    for shards, needle in (
        ([{"offsets": [3, 0], "shape": [4, 3]}], r"offsets \[3, 0\] with shape \[4, 3\], outside the tensor's shape"),
        ([{"offsets": [0, 0], "shape": [2, 3]}] * 2, r"overlap: offsets \[0, 0\] shape \[2, 3\]"),
        ([{"offsets": [0, 0], "shape": [4, 3, 1]}], "not of the tensor's rank 2"),
    ):
        manifest["tensors"]["w"]["shape"] = [4, 3]
        manifest["tensors"]["w"]["shards"] = [{"file": "model_r00000.pt", **sh} for sh in shards]
        (path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(
            CheckpointError, match=f"^checkpoint tensor w in {re.escape(str(path))}: its shards .*{needle}"
        ) as info:
            load_checkpoint(path, verify=False)
        assert "\n" not in str(info.value)
    # Shards that tile but whose file holds another shape than the manifest says.
    manifest["tensors"]["w"]["shards"] = [
        {"file": "model_r00000.pt", "offsets": [0, 0], "shape": [1, 3]},
        {"file": "model_r00000.pt", "offsets": [1, 0], "shape": [3, 3]},
    ]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=r"its shard in model_r00000.pt has shape \(4, 3\), manifest says \(1, 3\)"
    ):
        load_checkpoint(path, verify=False)
