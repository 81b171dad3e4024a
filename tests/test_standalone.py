"""The repository stands on its own: a clone of it alone runs the fast tests, and no tracked file
points at anything outside it. Both look at what is committed (HEAD), not at uncommitted changes."""
import os
import shutil
import subprocess
import sys

import pytest

from engine_helpers import world_dir
from reftools import REPO

# Written in pieces so that this file does not match itself. The project was first developed next to
# directories of background notes and tools that its users do not have.
OUTSIDE_REFERENCES = ("shared" + "/", "notes" + "/")
FAST_SELECTION = "not vm and not slurm"


def git(*args, cwd=REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def head():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout (or no git): nothing committed to check")
    return git("rev-parse", "HEAD").strip()


def test_no_tracked_file_refers_outside_the_repository(head):
    found = []
    for name in git("ls-files", "-z").split("\0"):
        path = REPO / name
        if not name or not path.is_file():
            continue  # deleted in the work tree: the committed copy is checked by the clone test's run
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            found += [f"{name}:{number}: {line.decode(errors='replace').strip()}"
                      for word in OUTSIDE_REFERENCES if word.encode() in line]
    assert not found, "files that refer outside the repository:\n" + "\n".join(found)


@pytest.fixture
def alone():
    """An empty directory for the clone, which every user can traverse as a checkout usually can: the
    engine tests run ``spank-sif open`` from the checkout for ordinary users, and the engine enters the
    caller's directory as that user even for an absolute image path (docs/testing.md)."""
    path = world_dir("spank-sif-alone-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_fast_suite_passes_in_a_bare_clone(head, alone, tmp_path):
    """`git clone` of HEAD into an empty directory (no siblings), then the fast selection there with a
    cache of its own, so the reference tools are built from the clone's sources."""
    clone = alone / "spank-sif"
    git("clone", "--quiet", "--no-hardlinks", str(REPO), str(clone), cwd=alone)
    assert git("rev-parse", "HEAD", cwd=clone).strip() == head, "the clone is not at this checkout's HEAD"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SPANK_SIF_TEST") and k not in ("PYTHONPATH", "GOCACHE", "GOFLAGS")}
    itself = f"tests/{os.path.basename(__file__)}::{test_fast_suite_passes_in_a_bare_clone.__name__}"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", FAST_SELECTION,
         "--deselect", itself, "--basetemp", str(tmp_path / "basetemp")],
        cwd=clone, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"the fast tests fail in a bare clone (exit {proc.returncode}):\n{tail}"
    assert (clone / ".cache" / "reftools" / "sifref").exists(), "the clone did not build its own tools"
