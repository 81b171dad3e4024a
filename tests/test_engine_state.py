"""State records (state.py): atomic JSON files, root-only, one per object, removable idempotently."""
import json
import os

import pytest

from spank_sif.errors import StateError
from spank_sif.state import StateDir, job_id


def test_record_update_remove_roundtrip(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    rec = state.record("session", "42.0", "spank-sif-42.0-00aa11bb", {"image": "/x.sif", "status": "opening"})
    assert rec.path == tmp_path / "state" / "42" / "spank-sif-42.0-00aa11bb~session.json"
    assert json.loads(rec.path.read_text())["status"] == "opening"
    created = rec.created
    rec2 = state.update(rec, status="unlocked")
    assert rec2.created == created and rec2.data["status"] == "unlocked" and rec2.data["image"] == "/x.sif"
    state.record("mount", "42.0", "spank-sif-42.0-00aa11bb", {"target": "/sif"}, key="1234")
    assert [(r.kind, r.key) for r in state.records("42")] == [("session", ""), ("mount", "1234")]
    assert state.jobs() == ["42"]
    state.remove("mount", "42.0", "spank-sif-42.0-00aa11bb", "1234")
    state.remove("mount", "42.0", "spank-sif-42.0-00aa11bb", "1234")  # already gone: fine
    assert not state.drop_job_dir("42")  # still holds the session record
    state.remove("session", "42.0", "spank-sif-42.0-00aa11bb")
    assert state.drop_job_dir("42") and state.jobs() == []


def test_directories_are_private(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    state.record("loop", "7.batch", "spank-sif-7.batch-0123abcd", {"device": "/dev/loop3"})
    for path in (tmp_path / "state", tmp_path / "state" / "7"):
        assert os.stat(path).st_mode & 0o777 == 0o700
    records = list((tmp_path / "state").rglob("*.json"))
    assert len(records) == 1 and os.stat(records[0]).st_mode & 0o077 == 0, records


def test_half_written_and_foreign_files_are_ignored(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    state.record("loop", "7", "spank-sif-7-0123abcd", {"device": None})
    (tmp_path / "state" / "7" / "junk.json").write_text("{not json")
    (tmp_path / "state" / "7" / ".x.json.99.tmp").write_text("{}")
    assert [r.kind for r in state.records()] == ["loop"]


@pytest.mark.parametrize("label", ["../etc", "a/b", "", "x" * 80, "-rf", "42 0"])
def test_labels_cannot_escape_the_state_directory(tmp_path, label):
    with pytest.raises(StateError, match="invalid"):
        StateDir(str(tmp_path)).record("session", label, "spank-sif-x-1", {})


def test_symlinked_state_directory_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "state").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateError, match="not a directory owned by"):
        StateDir(str(tmp_path / "state")).record("session", "1", "spank-sif-1-00", {})


def test_job_id_of_labels():
    assert [job_id(x) for x in ("42", "42.0", "42.batch", "cli")] == ["42", "42", "42", "cli"]
