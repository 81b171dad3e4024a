"""The package passes its linters: ruff and mypy, configured (and their rules explained) in
pyproject.toml. Part of the suite so that CI holds every change to them."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, MYPY_CACHE_DIR=str(REPO / ".cache" / "mypy")))


def test_ruff_is_clean():
    out = _run("ruff", "check", "--no-cache", "spank_sif", "csrc", "setup.py")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean():
    out = _run("mypy")
    assert out.returncode == 0, out.stdout + out.stderr
