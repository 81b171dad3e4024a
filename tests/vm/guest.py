"""First step inside the VM (run as root by vng): load the modules the tests need, give them a tmpfs work
directory, run the requested command with its output going to the shared run directory, and record its
exit status there. Standalone on purpose: it runs before anything else is set up."""
import json
import os
import subprocess
import sys
from pathlib import Path

from capability import IN_VM_VARIABLE, load_modules


def prepare(work: Path, local: bool) -> None:
    work.mkdir(parents=True, exist_ok=True)
    if not local:
        load_modules()
        # cryptsetup cannot format volumes on the 9p-shared directories: keep work on a tmpfs.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "spank-sif-vm", str(work)], check=True)
        subprocess.run(["ip", "link", "set", "lo", "up"], stderr=subprocess.DEVNULL)
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o1777)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    prepare(work, spec["local"])
    env = dict(spec["env"], SPANK_SIF_VM_WORK=str(work), TMPDIR=str(work / "tmp"),
               PYTHONDONTWRITEBYTECODE="1")
    env[IN_VM_VARIABLE] = "1"
    with open(spec["stdout"], "wb") as out, open(spec["stderr"], "wb") as err:
        rc = subprocess.run(spec["argv"], cwd=spec["cwd"], env=env, stdin=subprocess.DEVNULL,
                            stdout=out, stderr=err).returncode
    Path(spec["returncode"]).write_text(str(rc))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
