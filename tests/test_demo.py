"""The demo's real job (scripts/demo_job.py): on a node with dm-crypt, a single-node Slurm with
the installed plugin runs `srun --sif-image=<demo image> cat <mount point>/hello.txt` as an
ordinary user, prints the image's file, and leaves nothing on the node. Here it runs inside the
VM session (the script itself boots a VM only when called on a machine without dm-crypt)."""
import subprocess
import sys
from pathlib import Path

import pytest

from spank_sif.cli.demo import HELLO

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.vm, pytest.mark.slurm, pytest.mark.root]


def test_the_demo_job_prints_the_image_file_and_leaves_nothing(tmp_path):
    demo = tmp_path / "demo"
    built = subprocess.run([sys.executable, "-m", "spank_sif", "demo", str(demo), "--fast-kdf"],
                           capture_output=True, text=True, cwd=REPO)
    assert built.returncode == 0, built.stdout + built.stderr
    job = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_job.py"), str(demo)],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    out = job.stdout
    assert job.returncode == 0, out + job.stderr
    assert "srun --sif-image=" in out and HELLO.decode() in out
    assert "nothing left on the node" in out
