"""The Ray executor: the same pipeline on a one-CPU local Ray instance gives the local executor's output, its shards
run as Ray tasks (in other processes), a crashed run resumes without redoing finished shards, and errors raised in a
task arrive as the task's own one-line error."""

import importlib.util
import os
from dataclasses import dataclass

import pytest

from engine.data.curate import main
from engine.data.curation import ray_executor
from engine.data.curation.pipeline import Pipeline
from engine.data.curation.ray_executor import RayExecutor
from engine.data.curation.runner import curate
from engine.data.curation.steps import CurationError, DocumentStep, make_step
from tests.data.curation.corpus import prose, write_jsonl
from tests.data.curation.test_resume import contents

HAS_RAY = importlib.util.find_spec("ray") is not None


@dataclass
class PidLogStep(DocumentStep):
    """Appends the id of the process that ran it to `log`, once per document."""

    name = "pid_log_for_test"
    log: str = ""

    def process(self, text: str) -> tuple[str, str | None]:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return text, None


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def corpus(tmp_path) -> list[str]:
    files = []
    for i in range(3):  # each file: a document with an e-mail address and an exact copy of file 0's first one
        docs = [
            {"id": f"{i}a", "text": prose(i) + " Mail a@corp.io."},
            {"id": f"{i}b", "text": prose(0) + " Mail a@corp.io."},
        ]
        files.append(write_jsonl(tmp_path / f"in{i}.jsonl", docs))
    return files


def markers(out) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every stage-1 marker: a redone shard renames a new one into place."""
    process = out / ".curation" / "process"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(process.glob("*.done"))}


def test_without_ray_a_cluster_or_the_ray_executor_the_cli_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": prose(0)}])
    args = ["--input", src, "--output", str(tmp_path / "out"), "--steps", "pii", "--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--ray-address", "auto"])
    assert exit_.value.code == 2 and "--ray-address needs --executor ray" in capsys.readouterr().err
    if HAS_RAY and "RAY_ADDRESS" not in os.environ:  # runs before the other test starts a Ray instance here
        assert main([*args, "--executor", "ray", "--ray-address", "auto"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot join the Ray cluster at auto: ") and err.count("\n") == 1
    monkeypatch.setattr(ray_executor.importlib.util, "find_spec", lambda name: None)  # as where ray is absent
    assert main([*args, "--executor", "ray"]) == 2
    assert capsys.readouterr().err == f"error: {ray_executor.NEEDS_RAY}\n"


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install -e '.[ray]')")
def test_ray_matches_the_local_executor_and_resumes_without_redoing_finished_shards(tmp_path, local_ray):
    files = corpus(tmp_path)
    log = tmp_path / "pids.log"
    pipeline = Pipeline([PidLogStep(log=str(log)), make_step("exact_dedup"), make_step("pii")])
    expected = curate(files, str(tmp_path / "local"), pipeline, progress=False)
    log.write_text("")
    out = tmp_path / "ray"
    report = curate(files, str(out), pipeline, progress=False, executor=RayExecutor(progress=False))
    assert contents(out) == contents(tmp_path / "local") and len(contents(out)) == 3
    assert [s["removed"] for s in report["steps"]] == [s["removed"] for s in expected["steps"]]
    assert report["steps"][1]["removed"] == {"exact_duplicate": 3} and report["steps"][2]["documents_changed"] == 3
    pids = log.read_text().split()
    assert len(pids) == 6 and str(os.getpid()) not in pids  # every shard ran in a Ray worker

    before = markers(out)
    work = out / ".curation"
    for path in [work / "process" / "00001.done", work / "dedup.done", *(work / "write").glob("*.done")]:
        os.remove(path)  # as if the run died in stage 1 while shard 1 was being processed
    log.write_text("")
    resumed = curate(files, str(out), pipeline, progress=False, executor=RayExecutor(progress=False))
    after = markers(out)
    assert len(log.read_text().split()) == 2  # only shard 1's two documents were filtered again
    assert after["00000.done"] == before["00000.done"] and after["00002.done"] == before["00002.done"]
    assert after["00001.done"] != before["00001.done"]
    assert contents(out) == contents(tmp_path / "local") and resumed["documents_out"] == expected["documents_out"]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text"}])
    with pytest.raises(CurationError, match=r"bad\.jsonl:2: no text key 'text'") as error:
        curate([bad], str(tmp_path / "bad"), pipeline, progress=False, executor=RayExecutor(progress=False))
    assert "\n" not in str(error.value)  # the task's own error, not Ray's wrapper with its traceback
