"""Checkpoint saving under faults: a crash at each step of the protocol, retention failing mid-way, filesystems
that refuse directory fsync, and a corrupt manifest. Every case checks that what is listed as complete loads."""

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from engine.checkpoint import checkpointer
from engine.checkpoint.checkpointer import (
    CheckpointError,
    apply_retention,
    complete_checkpoints,
    damaged_checkpoints,
    latest_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
)
from engine.checkpoint.reader import load_checkpoint


class Crash(Exception):
    """A simulated process death: raised where the real process would stop."""


def _save(root, step, value, keep=0):
    """A small checkpoint whose contents tell saves apart (`value`)."""
    return save_checkpoint(
        root,
        step,
        tensors={"model": {"w": torch.full((4, 3), float(value)), "b": torch.arange(3.0) + value}},
        objects={"value": value},
        rank_objects={"rank_value": value},
        meta={"config": {"value": value}},
        keep=keep,
    )


def _value(path):
    ck = load_checkpoint(path)
    assert torch.equal(ck.tensors["model"]["w"], torch.full((4, 3), float(ck.objects["value"])))
    return ck.objects["value"]


def _steps(root):
    return [s for s, _ in complete_checkpoints(root)]


def _all_listed_load(root):
    for _, d in complete_checkpoints(root):
        load_checkpoint(d)


def _hidden(root):
    return sorted(n for n in os.listdir(root) if n.startswith(".step_"))


def _crash_after_rename_of(monkeypatch, src_name):
    """os.replace/os.rename do the rename of a directory named `src_name`, then the process "dies"."""
    calls = []
    for fn in ("replace", "rename"):
        real = getattr(os, fn)

        def fake(src, dst, *args, _real=real, **kwargs):
            _real(src, dst, *args, **kwargs)
            if Path(src).name == src_name:
                calls.append((Path(src).name, Path(dst).name))
                raise Crash(f"killed after renaming {src_name}")

        monkeypatch.setattr(os, fn, fake)
    return calls


# -- 1. saving a step again: a crash between moving the old copy aside and renaming the new one in -------------------


def test_resave_crash_after_moving_old_copy_aside_recovers_it(tmp_path, monkeypatch):
    _save(tmp_path, 1, 10)
    _save(tmp_path, 2, 20)
    calls = _crash_after_rename_of(monkeypatch, "step_00000002")
    with pytest.raises(Crash):
        _save(tmp_path, 2, 21)  # a resumed run redoing step 2
    monkeypatch.undo()
    assert calls  # the old copy was moved aside, so there was a moment without step_00000002
    assert not (tmp_path / "step_00000002").exists()

    # `latest` names step 2: it resolves again (the old copy renamed back), and it is the old save that loads.
    found = latest_checkpoint(tmp_path)
    assert found is not None and found.name == "step_00000002"
    assert _value(found) == 20
    assert _steps(tmp_path) == [1, 2]
    assert not (tmp_path / ".step_00000002.old").exists()
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert resolve_checkpoint_path(tmp_path).name == "step_00000002"

    # Saving step 2 again afterwards works and leaves no hidden directory behind.
    assert _value(_save(tmp_path, 2, 22)) == 22
    assert _hidden(tmp_path) == []


def test_resave_crash_is_recovered_by_listing_and_by_the_next_save(tmp_path, monkeypatch):
    _save(tmp_path, 1, 10)
    _save(tmp_path, 2, 20)
    _crash_after_rename_of(monkeypatch, "step_00000002")
    with pytest.raises(Crash):
        _save(tmp_path, 2, 21)
    monkeypatch.undo()
    assert _steps(tmp_path) == [1, 2]  # complete_checkpoints alone recovers it
    assert _value(tmp_path / "step_00000002") == 20

    _crash_after_rename_of(monkeypatch, "step_00000002")
    with pytest.raises(Crash):
        _save(tmp_path, 2, 21)
    monkeypatch.undo()
    _save(tmp_path, 3, 30)  # the next save recovers it too, before it writes anything
    assert _steps(tmp_path) == [1, 2, 3] and _value(tmp_path / "step_00000002") == 20
    assert _hidden(tmp_path) == []


def test_resave_crash_after_the_swap_drops_the_old_copy(tmp_path, monkeypatch):
    _save(tmp_path, 1, 10)
    _save(tmp_path, 2, 20)
    _crash_after_rename_of(monkeypatch, ".step_00000002.tmp")  # the new copy is in place, the old one still aside
    with pytest.raises(Crash):
        _save(tmp_path, 2, 21)
    monkeypatch.undo()
    assert _steps(tmp_path) == [1, 2] and _value(latest_checkpoint(tmp_path)) == 21
    # The aside copy is never taken for the step again, even once step_00000002 is retired, and the next save
    # removes it.
    assert not (tmp_path / ".step_00000002.old" / "manifest.json").exists()
    _save(tmp_path, 3, 30)
    assert _hidden(tmp_path) == []
    apply_retention(tmp_path, 1)
    assert _steps(tmp_path) == [3]


# -- 2. retention failing mid-way through deleting a directory --------------------------------------------------------


def test_retention_failing_mid_delete_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        _save(tmp_path, step, step * 10)
    real_rmtree = shutil.rmtree
    failed = []

    def rmtree(path, *args, **kwargs):
        # The first removal of step 1 deletes one shard file, then meets a file it cannot remove.
        if "step_00000001" in Path(path).name and not failed:
            failed.append(Path(path).name)
            os.remove(Path(path) / "model_r00000.pt")
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(path) / "objects.pt"))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.warns(UserWarning, match="step_00000001"):
        _save(tmp_path, 4, 40, keep=2)  # retires steps 1 and 2
    monkeypatch.undo()
    assert failed
    assert _steps(tmp_path) == [3, 4]
    _all_listed_load(tmp_path)
    (tmp_path / "latest").unlink()
    assert _value(latest_checkpoint(tmp_path)) == 40

    # The half-deleted directory is hidden, and the next save removes it.
    assert _hidden(tmp_path) == [".step_00000001.deleting"]
    _save(tmp_path, 5, 50, keep=2)
    assert _steps(tmp_path) == [4, 5] and _hidden(tmp_path) == []


def test_half_deleted_step_from_a_crash_is_cleaned_by_retention(tmp_path):
    for step in (1, 2):
        _save(tmp_path, step, step * 10)
    os.replace(tmp_path / "step_00000001", tmp_path / ".step_00000001.deleting")  # retention's rename, then a crash
    (tmp_path / ".step_00000001.deleting" / "objects.pt").unlink()
    assert _steps(tmp_path) == [2]
    assert apply_retention(tmp_path, 1) == []
    assert _hidden(tmp_path) == []


# -- 3. directory fsync on filesystems that refuse it -----------------------------------------------------------------


def _fail_directory_fsync(monkeypatch, code):
    real = os.fsync
    dir_calls = []

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            dir_calls.append(fd)
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return dir_calls


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP, errno.EBADF])
def test_directory_fsync_refused_by_the_filesystem_is_ignored(tmp_path, monkeypatch, code):
    _save(tmp_path, 1, 10)
    dir_calls = _fail_directory_fsync(monkeypatch, code)
    _save(tmp_path, 2, 20)
    _save(tmp_path, 2, 21)  # the re-save path too
    _save(tmp_path, 3, 30, keep=1)  # and retention
    monkeypatch.undo()
    assert dir_calls
    assert _steps(tmp_path) == [3] and _value(latest_checkpoint(tmp_path)) == 30
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_directory_fsync_io_errors_still_fail_the_save(tmp_path, monkeypatch, code):
    _save(tmp_path, 1, 10)
    _fail_directory_fsync(monkeypatch, code)
    with pytest.raises(OSError) as info:
        _save(tmp_path, 2, 20)
    monkeypatch.undo()
    assert info.value.errno == code
    assert _steps(tmp_path) == [1] and _value(latest_checkpoint(tmp_path)) == 10


# -- 4. a crash while the manifest is being written --------------------------------------------------------------------


def test_crash_mid_manifest_leaves_no_complete_step(tmp_path, monkeypatch):
    _save(tmp_path, 1, 10)
    real_dumps = json.dumps
    written = []

    def half_dump(obj, fp, **kwargs):
        text = real_dumps(obj, **kwargs)
        if '"files"' in text:  # the manifest
            fp.write(text[: len(text) // 2])
            fp.flush()
            written.append(len(text) // 2)
            raise Crash("killed while writing the manifest")
        fp.write(text)

    monkeypatch.setattr(checkpointer.json, "dump", half_dump)
    with pytest.raises(Crash):
        _save(tmp_path, 2, 20)
    monkeypatch.undo()
    assert written  # the manifest write was reached and cut short

    # No step_00000002 at all (the half manifest is only inside the hidden temporary directory).
    assert not (tmp_path / "step_00000002").exists()
    assert _steps(tmp_path) == [1]
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "step_00000002")
    # The previous step loads, also without the `latest` pointer (found by scanning).
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert _value(resolve_checkpoint_path(tmp_path)) == 10
    # Saving the step again works.
    assert _value(_save(tmp_path, 2, 21)) == 21 and _steps(tmp_path) == [1, 2]


# -- 5. a corrupt manifest in a step directory ------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["half", "", "[]", "\xff\xfe"])
def test_corrupt_manifest_is_incomplete_and_named_on_load(tmp_path, content):
    _save(tmp_path, 1, 10)
    path = _save(tmp_path, 2, 20)
    manifest = path / "manifest.json"
    if content == "half":
        text = manifest.read_text()
        manifest.write_text(text[: len(text) // 2])
    else:
        manifest.write_bytes(content.encode("latin-1"))

    assert _steps(tmp_path) == [1]
    assert latest_checkpoint(tmp_path).name == "step_00000001"  # `latest` names step 2: stale, so scanned
    assert [(s, d.name) for s, d, _ in damaged_checkpoints(tmp_path)] == [(2, "step_00000002")]
    with pytest.raises(CheckpointError) as info:  # a user path: the damage is named, not passed over for step 1
        resolve_checkpoint_path(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "damaged" in message and str(manifest) in message and "step_00000001" in message
    assert apply_retention(tmp_path, 1) == []  # never counted, so never deleted in favour of it either
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(manifest) in message and "corrupt" in message
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(resolve_checkpoint_path(path))


def test_optimizer_implementation_is_this_runs_choice_on_resume():
    """optim.impl may change on resume: loading a foreach AdamW's state into a fused one keeps it fused (the saved
    param groups used to bring back the old implementation flags)."""
    from torch import nn

    from engine.checkpoint.state import named_to_optimizer_state, optimizer_state_to_named

    model = nn.Linear(4, 3)
    names = {id(p): n for n, p in model.named_parameters()}
    saved_opt = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=True)
    model(torch.randn(2, 4)).sum().backward()
    saved_opt.step()
    tensors, meta = optimizer_state_to_named(saved_opt, names)
    live = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    named_to_optimizer_state(live, names, tensors, meta)
    assert live.param_groups[0]["fused"] is True and not live.param_groups[0]["foreach"]
    assert torch.equal(live.state[model.weight]["exp_avg"], saved_opt.state[model.weight]["exp_avg"])
