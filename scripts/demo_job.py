"""The demo's last act: the product's real job. Starts a single-node Slurm with the installed plugin
and runs, as an ordinary user (nobody), on the encrypted demo image:
``srun --sif-image=<demo image> cat <mount point>/hello.txt`` (the image mounted for the task) and
``srun --sif-image=<demo image> --sif-container cat /hello.txt`` (the task inside the image), prints
each command and its output, then shows that nothing is left on the node (no mapping, loop device,
mount or state record).

The node needs a kernel with dm-crypt. Where this one has none (a VM without device-mapper, as CI
machines are), the same script runs inside the test harness's VM: Debian's kernel under software
emulation, booted for this, with this machine's files as its root file system.

usage: python3 scripts/demo_job.py DEMO_DIR      (as root; DEMO_DIR holds what `spank-sif demo` built)
"""
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test harness's VM launcher and Slurm cluster

from slurm import SlurmCluster  # noqa: E402
from vm.capability import dmcrypt_missing, in_vm  # noqa: E402
from vm.harness import VmUnavailable, run_in_vm  # noqa: E402

JOB_USER = "nobody"  # an ordinary user every Debian system has: no account is created
VM_SECONDS = 150     # what the VM run takes on a 2-core machine, said before it starts
IMAGE, KEY = "demo-pem.sif", "demo.pem"


def say(text: str = "") -> None:
    print(text, flush=True)


def give_to_job_user(source: Path, directory: Path, mode: int) -> Path:
    """A copy the job's user owns (the plugin opens images and key files as the user)."""
    entry = pwd.getpwnam(JOB_USER)
    dest = directory / source.name
    shutil.copyfile(source, dest)
    os.chown(dest, entry.pw_uid, entry.pw_gid)
    os.chmod(dest, mode)
    return dest


def leftovers(cluster: SlurmCluster, mount_point: str) -> list[str]:
    """What the system (not the plugin) shows of the job after it ended."""
    found = []
    mapped = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
    found += [f"mapping {line.split()[0]}" for line in mapped.splitlines() if line.startswith("spank-sif-")]
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                           capture_output=True, text=True).stdout
    found += [f"loop device {line.split()[0]}" for line in loops.splitlines() if IMAGE in line]
    for info in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            if f" {mount_point} " in info.read_text():
                found.append(f"a mount at {mount_point} (pid {info.parent.name})")
        except OSError:
            pass
    if cluster.state_dir.exists():
        found += [f"state record {p.relative_to(cluster.state_dir)}" for p in cluster.state_dir.rglob("*.json")]
    return found


def wait_clean(cluster: SlurmCluster, mount_point: str, timeout: float = 60) -> list[str]:
    """Teardown runs when the step ends, after srun has returned: give it its moment."""
    cluster.wait_jobs_done(timeout)
    deadline = time.monotonic() + timeout
    while (left := leftovers(cluster, mount_point)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def run_job(demo: Path) -> int:
    """On a node with dm-crypt: the cluster, the job, the clean-up check."""
    work = Path("/run/spank-sif-demo")  # short paths in what the demo prints; a tmpfs on most systems
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o755)
    work.chmod(0o755)
    cluster = SlurmCluster(work / "slurm")
    # /sif is the usual mount point; the VM's root file system is read-only, so there the demo
    # mounts under /run (a site sets mount_point in /etc/slurm/spank_sif.yaml).
    mount_point = "/run/sif" if in_vm() else "/sif"
    try:
        say("starting a single-node Slurm (slurmctld, slurmd) with the spank-sif plugin ...")
        cluster.start(users=())
        cluster.write_site_config(f"mount_point: {mount_point}\n")
        image = give_to_job_user(demo / IMAGE, work, 0o644)
        key = give_to_job_user(demo / KEY, work, 0o600)
        say(f"\nas user {JOB_USER}, with APPTAINER_ENCRYPTION_PEM_PATH={key}:")
        ok = True
        for title, command in (
                ("the image mounted for the task",
                 ["srun", f"--sif-image={image}", "cat", f"{mount_point}/hello.txt"]),
                ("the task inside the image", ["srun", f"--sif-image={image}", "--sif-container", "cat", "/hello.txt"])):
            say(f"\n# {title}\n$ {' '.join(command)}")
            out = cluster.run(command, user=JOB_USER, cwd=str(work),
                              env={"APPTAINER_ENCRYPTION_PEM_PATH": str(key)})
            sys.stdout.write(out.stdout)
            sys.stdout.write(out.stderr)
            say(f"(exit {out.returncode})")
            ok = ok and out.returncode == 0 and "Hello from inside an encrypted SIF image" in out.stdout
        left = wait_clean(cluster, mount_point)
        say("\nafter the jobs: " + ("nothing left on the node: no dm-crypt mapping, no loop device, no "
                                    "mount, no state record" if not left else "LEFT BEHIND: " + ", ".join(left)))
        return 0 if ok and not left else 1
    finally:
        cluster.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def run_in_a_vm(demo: Path) -> int:
    """Boot the harness's VM and run this script there; show its output as it comes."""
    say(f"This machine cannot map encrypted volumes ({dmcrypt_missing()}): running the job in a VM "
        f"(Debian's kernel under software emulation; about {VM_SECONDS // 60}-{VM_SECONDS // 60 + 1} "
        "minutes, most of it booting and starting Python) ...")
    rundir = Path(tempfile.mkdtemp(prefix="spank-sif-demo-vm-"))
    result = {}
    vm = threading.Thread(target=lambda: result.update(run=_boot(demo, rundir)), daemon=True)
    start = time.monotonic()
    vm.start()
    shown = 0
    stdout = rundir / "guest.stdout"
    while vm.is_alive() or (stdout.exists() and stdout.stat().st_size > shown):
        vm.join(timeout=1)
        text = stdout.read_bytes()[shown:].decode(errors="replace") if stdout.exists() else ""
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            shown += len(text.encode())
        elif not shown and vm.is_alive() and int(time.monotonic() - start) % 15 == 0:
            say(f"  ... booting ({time.monotonic() - start:.0f} s)")
    run = result.get("run")
    if isinstance(run, VmUnavailable) or run is None:
        say(f"cannot start the VM: {run}")
        return 1
    if run.returncode is None:
        say(f"the VM gave no result ({'timed out' if run.timed_out else 'it stopped'}):\n{run.tail()}")
        return 1
    sys.stdout.write(run.stderr)
    say(f"(VM run: {run.seconds:.0f} s)")
    return run.returncode


def _boot(demo: Path, rundir: Path):
    try:
        return run_in_vm([sys.executable, str(Path(__file__).resolve()), str(demo)], rundir=rundir,
                         rwdirs=(demo,), timeout=900, cwd=REPO)
    except VmUnavailable as exc:
        return exc


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 64
    demo = Path(argv[0]).resolve()
    if not (demo / IMAGE).exists():
        print(f"{demo / IMAGE} not found: run `spank-sif demo {demo}` first", file=sys.stderr)
        return 64
    if in_vm() or dmcrypt_missing() is None:
        return run_job(demo)
    return run_in_a_vm(demo)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
