"""First step inside the VM (run as root by vng): load the modules the tests need, give them a tmpfs work
directory, run the requested command with its output going to the shared run directory, and record its
exit status there. Standalone on purpose: it runs before anything else is set up."""
import json
import socket
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
        network()
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o1777)


def network() -> None:
    """The guest has no NIC. Daemons that resolve the host name (Slurm) need an address for it besides
    loopback: a dummy interface with a link-local address (docs/testing.md, "Slurm inside the VM")."""
    for command in ("ip link set lo up", "ip link add sv0 type dummy", "ip addr add 169.254.77.1/32 dev sv0",
                    "ip link set sv0 up"):
        subprocess.run(command.split(), stderr=subprocess.DEVNULL)
    with open("/etc/hosts", "a") as hosts:  # a writable copy in the guest
        hosts.write(f"169.254.77.1 {socket.gethostname().split('.')[0]}\n")


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
