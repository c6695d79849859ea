"""Resumability: a run really killed mid-way (os._exit in the per-file stage, in a subprocess) and run again redoes only
the unfinished files, and ends with exactly the output of an uninterrupted run."""

import glob
import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.data.curation.executor import WorkerDied
from engine.data.curation.pipeline import Pipeline
from engine.data.curation.runner import curate
from engine.data.curation.steps import DocumentStep, make_step
from tests.data.curation.corpus import prose, write_jsonl

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class DieOnceStep(DocumentStep):
    """Logs every document it sees; on the first document containing 'DIE' it kills its process, once (a file marks
    that it has died)."""

    name = "die_once_for_test"
    died_marker: str = ""
    log: str = ""

    def process(self, text: str) -> tuple[str, str | None]:
        with open(self.log, "a") as f:
            f.write(text.split()[1] + "\n")
        if "DIE" in text and not os.path.exists(self.died_marker):
            Path(self.died_marker).touch()
            os._exit(17)  # no cleanup, no exception handlers: as a SIGKILL would leave it
        return text, None


def pipeline(tmp: Path) -> Pipeline:
    die = DieOnceStep(died_marker=str(tmp / "died"), log=str(tmp / "seen.log"))  # a step object needs no name
    return Pipeline([die, make_step("exact_dedup"), make_step("minhash_dedup"), make_step("pii")])


def corpus(tmp: Path) -> list[str]:
    files = []
    for i in range(4):
        # per file: a document, a near duplicate of it (two words differ), an exact duplicate of it
        docs = [{"id": f"{i}-{j}", "text": f"Doc d{i}x{j % 2} " + prose(i)} for j in range(3)]
        if i == 2:
            docs[1]["text"] += " DIE"  # the kill comes in the middle of the third file
        files.append(write_jsonl(tmp / f"in{i}.jsonl", docs))
    return files


def run_killed(files: list[str], out: Path, tmp: Path) -> int:
    code = (
        "import sys; from pathlib import Path; from tests.data.curation import test_resume as t; "
        "from engine.data.curation.runner import curate; "
        "curate(sys.argv[3:], sys.argv[1], t.pipeline(Path(sys.argv[2])), progress=False)"
    )
    return subprocess.run([sys.executable, "-c", code, str(out), str(tmp), *files], cwd=ROOT, timeout=120).returncode


def contents(out: Path) -> dict[str, bytes]:
    return {os.path.basename(p): gzip.open(p).read() for p in sorted(glob.glob(f"{out}/*.jsonl.gz"))}


def test_killed_run_resumes_where_it_stopped(tmp_path):
    files = corpus(tmp_path)
    out = tmp_path / "out"
    assert run_killed(files, out, tmp_path) == 17
    process = out / ".curation" / "process"
    assert sorted(p.name for p in process.glob("*.done")) == ["00000.done", "00001.done"]
    assert glob.glob(f"{process}/.00002.docs.jsonl.gz.tmp-*")  # the killed writer's temporary file
    (tmp_path / "seen.log").write_text("")
    report = curate(files, str(out), pipeline(tmp_path), progress=False)
    seen = (tmp_path / "seen.log").read_text().split()
    assert seen == [f"d{i}x{j % 2}" for i in (2, 3) for j in range(3)]  # files 0 and 1 were not redone
    assert not glob.glob(f"{process}/.*tmp-*")

    clean = tmp_path / "clean"
    expected = curate(files, str(clean), pipeline(tmp_path), progress=False)  # 'died' exists: no kill now
    assert contents(out) == contents(clean) and len(contents(out)) == 4
    assert [s["removed"] for s in report["steps"]] == [s["removed"] for s in expected["steps"]]
    assert report["steps"][1]["removed"] == {"exact_duplicate": 4}
    assert report["steps"][2]["removed"] == {"near_duplicate": 4}
    assert report["documents_out"] == expected["documents_out"] == 4


def test_a_stage_without_its_marker_is_redone_and_one_with_it_is_not(tmp_path):
    (tmp_path / "died").touch()
    files = corpus(tmp_path)
    out = tmp_path / "out"
    curate(files, str(out), pipeline(tmp_path), progress=False)
    before = contents(out)
    work = out / ".curation"
    kept_mtime = (work / "write" / "00000.done").stat().st_mtime_ns
    os.remove(work / "write" / "00003.done")  # as if killed after writing the output, before its marker
    os.remove(work / "dedup.done")
    (out / "00003_in3.jsonl.gz").write_bytes(b"half-written")
    (tmp_path / "seen.log").write_text("")
    report = curate(files, str(out), pipeline(tmp_path), progress=False)
    assert (tmp_path / "seen.log").read_text() == ""  # the per-file stage was complete: nothing re-filtered
    assert contents(out) == before and (work / "write" / "00000.done").stat().st_mtime_ns == kept_mtime
    assert json.load(open(out / "report.json"))["documents_out"] == report["documents_out"] == 4


def test_a_dead_pool_worker_stops_the_run_and_a_rerun_finishes_it(tmp_path):
    files = corpus(tmp_path)
    with pytest.raises(WorkerDied, match="a worker process died; finished files are kept, run again to resume"):
        curate(files, str(tmp_path / "out"), pipeline(tmp_path), workers=2, progress=False)
    assert not (tmp_path / "out" / ".curation" / "process" / "00002.done").exists()
    report = curate(files, str(tmp_path / "out"), pipeline(tmp_path), workers=2, progress=False)
    assert report["documents_out"] == 4 and len(contents(tmp_path / "out")) == 4
